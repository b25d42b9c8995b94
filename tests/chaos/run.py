"""The chaos run: the whole mesh as processes, steady merchant load, one fault at a time.

Each fault has a quiet lead-in, the fault itself and a recovery window; the caller's
``/breakers`` is polled throughout so the faulted edge's breaker can be timed. Afterwards the
money invariants are checked against every store, and ``var/chaos/report.json`` plus a
timeline PNG are written. ``run()`` returns the report; its ``passed`` says whether every
invariant held. The breaker's open time comes from a policy file written next to the report
(``open_s`` shortened so a run takes minutes, not half an hour; everything else as deployed).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interceptors.policy import DEFAULT_POLICY_FILE, POLICY_FILE_VAR, PolicyConfig
from services.admin_token import FAULT_INJECTION_VAR, admin_authorization, with_admin_token
from services.launcher import Mesh, ephemeral_environ
from services.tls import TransportSecurity
from services.topology import Topology
from tests.chaos.invariants import (
    Check,
    check_deadlines,
    check_money,
    check_success_outside_faults,
    gateway_payments,
)
from tests.chaos.load import Attempt, MerchantLoad, onboard

#: Share of the payments started outside every fault window that must SUCCEED: a run in
#: which the mesh fails everything would pass every money invariant, so this is one too.
MIN_SUCCESS_OUTSIDE_FAULTS = 0.95
RECOVERY_SLACK_S = 5.0
POLL_S = 0.25


@dataclass(slots=True)
class Fault:
    """One fault: how to inject and heal it, and which breaker edge it should affect."""

    name: str
    description: str
    caller: str
    """Service whose /breakers holds the faulted edge."""
    target: str
    """The edge's target (a service or an HTTP partner)."""
    expect_open: bool | None
    """True: must open; False: must stay closed; None: may open (must close again)."""
    duration_s: float
    """Seconds between inject and heal."""
    inject: Callable[[Mesh, Topology], None]
    heal: Callable[[Mesh, Topology], None]
    times: dict[str, float] = field(default_factory=dict)
    """start, healed, end: seconds since the run's start."""


def _http(
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 2.0,
    headers: dict[str, str] | None = None,
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.load(reply)


def _control(mesh: Mesh, method: str, url: str, body: Any = None) -> Any:
    """A request to a control route (``/faults``, ``/_control/faults``): with the admin token."""
    return _http(method, url, body, headers=admin_authorization(mesh.environ))


def _restart(mesh: Mesh, name: str) -> None:
    mesh.start_member(name)
    mesh.wait_ready([name], timeout_s=60)


def _kill_and_restart(mesh: Mesh, name: str) -> None:
    mesh.signal(name, signal.SIGKILL)
    _restart(mesh, name)


def all_faults() -> list[Fault]:
    """The five faults of issue 7, in the order they run."""
    return [
        Fault(
            name="order_service_kill9",
            description="kill -9 order-service, restart it 12 s later",
            caller="payment-gateway",
            target="order-service",
            expect_open=True,
            duration_s=12.0,
            inject=lambda mesh, topo: mesh.signal("order-service", signal.SIGKILL),
            heal=lambda mesh, topo: _restart(mesh, "order-service"),
        ),
        Fault(
            name="channel_adapter_sigstop",
            description="SIGSTOP channel-adapter for 15 s (deadline 5 s), then SIGCONT",
            caller="payment-gateway",
            target="channel-adapter",
            expect_open=True,
            duration_s=15.0,
            inject=lambda mesh, topo: mesh.signal("channel-adapter", signal.SIGSTOP),
            heal=lambda mesh, topo: mesh.signal("channel-adapter", signal.SIGCONT),
        ),
        Fault(
            name="risk_latency",
            description="+1500 ms on every RiskService call for 10 s (server-side /faults)",
            caller="payment-gateway",
            target="risk-service",
            expect_open=False,
            duration_s=10.0,
            inject=lambda mesh, topo: _control(
                mesh,
                "PUT",
                f"http://{topo.admin_address('risk-service')}/faults",
                [{"method": "/paymesh.risk.v1.RiskService/*", "delay_ms": 1500, "rate": 1.0}],
            ),
            heal=lambda mesh, topo: _control(
                mesh, "DELETE", f"http://{topo.admin_address('risk-service')}/faults"
            ),
        ),
        Fault(
            name="payment_channel_503",
            description="the payment-channel partner answers 503 to everything for 12 s",
            caller="channel-adapter",
            target="payment-channel",
            expect_open=True,
            duration_s=12.0,
            inject=lambda mesh, topo: _control(
                mesh,
                "POST",
                f"http://{topo.sandbox_address()}/_control/faults",
                {"partner": "payment-channel", "error_rate": 1.0, "status": 503},
            ),
            heal=lambda mesh, topo: _control(
                mesh, "DELETE", f"http://{topo.sandbox_address()}/_control/faults"
            ),
        ),
        Fault(
            name="accounting_restart",
            description="kill -9 accounting-service under load (mid-transaction), restart at once",
            caller="payment-gateway",
            target="accounting-service",
            expect_open=None,
            duration_s=0.0,
            inject=lambda mesh, topo: _kill_and_restart(mesh, "accounting-service"),
            heal=lambda mesh, topo: None,
        ),
    ]


class BreakerPoller:
    """Polls the callers' /breakers; samples of (t, caller, {target: state})."""

    def __init__(self, topology: Topology, callers: set[str], now: Callable[[], float]) -> None:
        self.topology = topology
        self.callers = sorted(callers)
        self.now = now
        self.samples: list[tuple[float, str, dict[str, str]]] = []

    def _poll(self, caller: str) -> dict[str, str] | None:
        try:
            return dict(
                _http("GET", f"http://{self.topology.admin_address(caller)}/breakers", timeout=1.0)[
                    "breakers"
                ]
            )
        except (OSError, ValueError, KeyError):
            return None  # stopped or restarting: no sample

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for caller in self.callers:
                t = self.now()
                states = await asyncio.to_thread(self._poll, caller)
                if states is not None:
                    self.samples.append((t, caller, states))
            await asyncio.sleep(POLL_S)

    def states(self, caller: str, target: str) -> list[tuple[float, str]]:
        """(t, state) of one edge; ``closed`` before the breaker exists."""
        return [(t, s.get(target, "closed")) for t, c, s in self.samples if c == caller]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _rate(attempts: list[Attempt]) -> float | None:
    """Share that succeeded as the merchant sees it (a payment SUCCEEDED, a read answered)."""
    return sum(a.succeeded for a in attempts) / len(attempts) if attempts else None


def _answered(attempts: list[Attempt]) -> float | None:
    """Share the mesh answered OK, whatever the payment's status."""
    return sum(a.ok for a in attempts) / len(attempts) if attempts else None


def _open_intervals(states: list[tuple[float, str]], end: float) -> list[tuple[float, float]]:
    intervals: list[tuple[float, float]] = []
    opened: float | None = None
    for t, state in states:
        if state != "closed" and opened is None:
            opened = t
        elif state == "closed" and opened is not None:
            intervals.append((opened, t))
            opened = None
    if opened is not None:
        intervals.append((opened, end))
    return intervals


def evaluate_fault(
    fault: Fault, attempts: list[Attempt], poller: BreakerPoller, open_s: float, window_s: float
) -> dict[str, Any]:
    """Figures and per-fault invariants of one fault window."""
    start, healed, end = fault.times["start"], fault.times["healed"], fault.times["end"]
    creates = [a for a in attempts if a.kind == "create"]
    during = [a for a in creates if start <= a.started < healed]
    after = [a for a in creates if healed <= a.started < end]
    states = [(t, s) for t, s in poller.states(fault.caller, fault.target) if start <= t <= end]
    opened_at = next((t for t, s in states if s == "open"), None)
    intervals = _open_intervals(states, end)
    closed_at_end = bool(states) and states[-1][1] == "closed"
    while_open = [
        a for a in creates if not a.ok and any(lo <= a.started < hi for lo, hi in intervals)
    ]
    # Full success: from some second after the heal on, every second's payments all succeed.
    limit = open_s + RECOVERY_SLACK_S
    seconds = range(int(healed), int(end))
    recovered_at: float | None = None
    for s in seconds:
        tail = [a for a in after if a.started >= s]
        if tail and all(a.succeeded for a in tail):
            recovered_at = max(float(s), healed)
            break
    checks = []
    if fault.expect_open is True:
        checks.append(
            Check(
                f"{fault.name}: breaker {fault.caller} -> {fault.target} opened within its window",
                opened_at is not None and opened_at - start <= window_s,
                "never opened"
                if opened_at is None
                else f"open {opened_at - start:.1f} s after the fault began",
            )
        )
    elif fault.expect_open is False:
        checks.append(
            Check(
                f"{fault.name}: breaker {fault.caller} -> {fault.target} stayed closed "
                "(latency within the deadline is not a failure)",
                opened_at is None and not intervals,
                "stayed closed" if not intervals else f"opened at {intervals[0][0] - start:.1f} s",
            )
        )
    if fault.expect_open is not False:
        checks.append(
            Check(
                f"{fault.name}: breaker {fault.caller} -> {fault.target} closed after recovery",
                closed_at_end,
                f"state at the window's end: {states[-1][1] if states else 'no sample'}"
                + (f"; opened {len(intervals)} time(s)" if intervals else "; never opened"),
            )
        )
    checks.append(
        Check(
            f"{fault.name}: full success within open_s + {RECOVERY_SLACK_S:g} s = {limit:g} s "
            "of the fault's end",
            recovered_at is not None and recovered_at - healed <= limit,
            "never back to full success in the window"
            if recovered_at is None
            else f"all payments succeed from {recovered_at - healed:.1f} s after the end",
        )
    )
    return {
        "name": fault.name,
        "description": fault.description,
        "edge": f"{fault.caller} -> {fault.target}",
        "start_s": round(start, 2),
        "healed_s": round(healed, 2),
        "end_s": round(end, 2),
        "time_to_open_s": None if opened_at is None else round(opened_at - start, 2),
        "open_intervals_s": [(round(lo - start, 2), round(hi - start, 2)) for lo, hi in intervals],
        "fast_fail_ms_while_open": {
            "count": len(while_open),
            "p50": _ms(_pct([a.latency_s for a in while_open], 0.5)),
            "p99": _ms(_pct([a.latency_s for a in while_open], 0.99)),
        },
        "success_rate_during": _rate(during),
        "success_rate_after": _rate(after),
        "answered_ok_during": _answered(during),
        "answered_ok_after": _answered(after),
        "attempts_during": len(during),
        "attempts_after": len(after),
        "recovered_after_s": None if recovered_at is None else round(recovered_at - healed, 2),
        "invariants": [c.as_dict() for c in checks],
        "_checks": checks,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def timeline(attempts: list[Attempt], duration: float) -> list[dict[str, Any]]:
    """Per second of attempt start: creates and reads, success rate, p50/p99 latency."""
    rows = []
    for s in range(int(duration) + 1):
        creates = [a for a in attempts if a.kind == "create" and s <= a.started < s + 1]
        reads = [a for a in attempts if a.kind == "read" and s <= a.started < s + 1]
        latencies = [a.latency_s for a in creates]
        rows.append(
            {
                "t": s,
                "creates": len(creates),
                "create_success": _rate(creates),
                "create_answered": _answered(creates),
                "read_success": _rate(reads),
                "p50_ms": _ms(_pct(latencies, 0.5)),
                "p99_ms": _ms(_pct(latencies, 0.99)),
            }
        )
    return rows


def write_policy(path: Path, open_s: float, window_s: float) -> None:
    """The deployed policy with the breaker's times shortened, validated like at start."""
    text = DEFAULT_POLICY_FILE.read_text()
    head, _, breaker = text.partition("[defaults.breaker]")
    section, sep, rest = breaker.partition("\n[")
    lines = []
    for line in section.splitlines():
        key = line.split("=")[0].strip()
        if key == "open_s":
            line = f"open_s = {open_s}  # shortened for make chaos"
        elif key == "window_s":
            line = f"window_s = {window_s}  # shortened for make chaos"
        lines.append(line)
    path.write_text(head + "[defaults.breaker]" + "\n".join(lines) + sep + rest)
    breaker_policy = PolicyConfig.load(str(path)).defaults.breaker
    assert (breaker_policy.open_s, breaker_policy.window_s) == (open_s, window_s)


async def _drain(
    gateway: str, merchants: list[Any], timeout_s: float, operator: TransportSecurity
) -> int:
    """Wait for the gateway's recovery to finish every pending payment; how many are left."""
    from tests.chaos.invariants import TERMINAL

    deadline = time.monotonic() + timeout_s
    while True:
        payments = await gateway_payments(gateway, merchants, operator)
        left = sum(1 for p in payments if p.status not in TERMINAL)
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(1.0)


async def run(
    *,
    out_dir: Path,
    faults: list[Fault] | None = None,
    lead_s: float = 5.0,
    open_s: float = 5.0,
    window_s: float = 10.0,
    recovery_window_s: float | None = None,
    creates_per_s: float = 10.0,
    reads_per_s: float = 4.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole run; returns the report (also written to ``out_dir/report.json``)."""
    faults = faults if faults is not None else all_faults()
    window_after = recovery_window_s if recovery_window_s is not None else open_s + 10.0
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    policy_file = out_dir / "policy.toml"
    write_policy(policy_file, open_s, window_s)
    environ = ephemeral_environ()
    environ[POLICY_FILE_VAR] = str(policy_file)
    environ["PAYMENT_GATEWAY_RECOVERY_INTERVAL_S"] = "2"
    var_dir = out_dir / "mesh"
    if var_dir.exists():
        import shutil

        shutil.rmtree(var_dir)
    # The faults below switch /faults and the sandbox's /_control/faults: both need this.
    environ[FAULT_INJECTION_VAR] = "1"
    environ = with_admin_token(environ, var_dir)
    mesh = Mesh(environ=environ, var_dir=var_dir)
    topology = Topology(environ=mesh.environ)
    addresses = {name: m.address for name, m in mesh.members.items()}
    log(
        f"chaos: starting the mesh ({len(mesh.members)} processes), breaker open_s {open_s:g} s,"
        f" window_s {window_s:g} s (deployed: 30 s, 60 s)"
    )
    mesh.start(timeout_s=90)
    started = time.monotonic()
    try:
        merchants = await onboard(
            addresses["merchant-service"], addresses["merchant-auth-service"], 3, mesh.operator
        )
        load = MerchantLoad(
            mesh.members["payment-gateway"].public_address,
            merchants,
            security=mesh.operator,
            creates_per_s=creates_per_s,
            reads_per_s=reads_per_s,
        )
        poller = BreakerPoller(topology, {f.caller for f in faults}, load.now)
        stop_load, stop_poll = asyncio.Event(), asyncio.Event()
        load_task = asyncio.create_task(load.run(stop_load))
        poll_task = asyncio.create_task(poller.run(stop_poll))
        log(
            f"chaos: load {creates_per_s:g} CreatePayment/s + {reads_per_s:g} reads/s, "
            f"{len(merchants)} merchants"
        )
        await asyncio.sleep(lead_s)
        for fault in faults:
            fault.times["start"] = load.now()
            log(f"chaos: [{load.now():6.1f}s] inject {fault.name}: {fault.description}")
            await asyncio.to_thread(fault.inject, mesh, topology)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(fault.heal, mesh, topology)
            fault.times["healed"] = load.now()
            log(f"chaos: [{load.now():6.1f}s] healed {fault.name}")
            await asyncio.sleep(window_after)
            fault.times["end"] = load.now()
        stop_load.set()
        await load_task
        stop_poll.set()
        await poll_task
        duration = load.now()
        log(f"chaos: load stopped at {duration:.1f}s; waiting for recovery to finish payments")
        left = await _drain(addresses["payment-gateway"], merchants, 30.0, mesh.operator)
        log(f"chaos: {left} payments still pending; checking invariants")
        checks = await check_money(
            addresses=addresses,
            sandbox_address=topology.sandbox_address(),
            merchants=merchants,
            record=load.record,
            operator=mesh.operator,
        )
        checks.append(check_deadlines(load.record))
        windows = [(f.times["start"], f.times["end"]) for f in faults]
        checks.append(
            check_success_outside_faults(load.record, windows, MIN_SUCCESS_OUTSIDE_FAULTS)
        )
        per_fault = [
            evaluate_fault(f, load.record.attempts, poller, open_s, window_s) for f in faults
        ]
        for figures in per_fault:
            checks += figures.pop("_checks")
        dead = [m.name for m in mesh.dead()]
        checks.append(
            Check(
                "every member of the mesh is running at the end (the killed ones came back)",
                not dead,
                f"dead: {dead}" if dead else f"{len(mesh.members)} running",
            )
        )
    finally:
        codes = mesh.stop()
    runs = load.record.payments
    report: dict[str, Any] = {
        "policy": {
            "file": str(policy_file),
            "breaker_open_s": open_s,
            "breaker_window_s": window_s,
            "others": "as deployed (services/policy.toml)",
        },
        "load": {
            "creates_per_s": creates_per_s,
            "reads_per_s": reads_per_s,
            "payments": len(runs),
            "succeeded": sum(1 for r in runs if r.final == "PAYMENT_STATUS_SUCCEEDED"),
            "finals": _count(r.final for r in runs),
            "client_attempts": len(load.record.attempts),
            "mean_attempts_per_payment": statistics.fmean(r.attempts for r in runs) if runs else 0,
        },
        "wall_s": round(time.monotonic() - started, 1),
        "faults": per_fault,
        "invariants": [c.as_dict() for c in checks],
        "passed": all(c.passed for c in checks),
        "dead_members_at_end": dead,
        "exit_codes": codes,
        "timeline": timeline(load.record.attempts, duration),
        "breaker_samples": [
            {"t": round(t, 2), "caller": c, "states": s} for t, c, s in poller.samples
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        from tests.chaos.plot import plot_timeline

        plot_timeline(report, faults, out_dir / "timeline.png")
        report["timeline_png"] = str(out_dir / "timeline.png")
    except ImportError as exc:  # matplotlib is a dev extra
        log(f"chaos: no PNG ({exc}); pip install -e '.[dev]'")
    for check in checks:
        log(check.line())
    return report


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts
