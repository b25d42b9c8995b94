"""The chaos run: the mesh under its real launcher, steady merchant load, one fault at a time.

The mesh runs as ``make run`` runs it
(``python -m services.tools.launcher``); the run signals members by
the pids in the launcher's ``launcher.json`` and never restarts one itself: a member killed
with -9 must come back by the launcher's hand. Each fault has a quiet lead-in, the fault
itself and a recovery window; the callers' ``/breakers`` are polled throughout so the faulted
edge's breaker can be timed, and the ledger is sampled about once a second. Afterwards the
money, webhook and payout invariants are checked against every store and the partners' own
records, and ``var/chaos/report.json`` plus a timeline PNG are written. ``run()`` returns the
report; its ``passed`` says whether every invariant held. Times shortened so a run takes
minutes (the breaker's open and window times through a policy file written next to the
report, the webhook retry schedule and the recovery loops' pace through the environment) are
in the report; everything else is as deployed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import signal
import statistics
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interceptors.policy import DEFAULT_POLICY_FILE, POLICY_FILE_VAR, PolicyConfig
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.notification.v1 import notification_pb2
from paymesh.withdrawal.v1 import withdrawal_pb2
from services.accounting import accounts
from services.mesh.admin_token import FAULT_INJECTION_VAR, admin_authorization, with_admin_token
from services.mesh.tls import TransportSecurity
from services.mesh.topology import Topology
from services.tools.launcher import ephemeral_environ
from services.tools.supervisor import LauncherReport, RestartPolicy
from tests.chaos.invariants import (
    TERMINAL,
    Check,
    check_deadlines,
    check_money,
    check_success_outside_faults,
    gateway_payments,
    pages,
)
from tests.chaos.launched import Comeback, LaunchedMesh
from tests.chaos.load import Attempt, Merchant, MerchantLoad, onboard
from tests.chaos.payouts import (
    COMPLETED,
    Payouts,
    check_bank_outage,
    check_ledger_samples,
    check_payouts_at_end,
    check_settlements_completed,
)
from tests.chaos.webhooks import (
    check_webhooks,
    notifications,
    outage_figures,
    received,
    requests_seen,
    wall_time,
)

#: Share of the payments started outside every fault window that must SUCCEED: a run in
#: which the mesh fails everything would pass every money invariant, so this is one too.
MIN_SUCCESS_OUTSIDE_FAULTS = 0.95
RECOVERY_SLACK_S = 5.0
POLL_S = 0.25
#: A member killed with -9 must answer SERVING again within this of the kill: the launcher's
#: first restart delay plus a start of the process on a busy two-core machine.
COMEBACK_BOUND_S = RestartPolicy().initial_backoff_s + 20.0
#: Longest wait after the load for recovery to finish payments, webhooks and payouts.
DRAIN_S = 60.0
WEBHOOK_OUTAGE_S = 60.0
BANK_OUTAGE_S = 20.0
#: The services' timings the run shortens (through their environment), and as deployed.
RUN_TIMINGS = {
    "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S": ("2", "30"),
    "NOTIFICATION_SERVICE_RETRY_INITIAL_S": ("1", "10"),
    "NOTIFICATION_SERVICE_RETRY_MAX_S": ("5", "3600"),
    "SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S": ("2", "10"),
    "WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S": ("2", "10"),
}

#: The faults of the short run CI executes: the launcher's kill -9 and a failing partner.
SHORT = ("order_service_kill9", "payment_channel_503")

Action = Callable[["Harness"], Awaitable[None]]


@dataclass(slots=True)
class Harness:
    """What the faults act on: the launched mesh, its topology, the run's payouts and clock."""

    mesh: LaunchedMesh
    topology: Topology
    payouts: Payouts
    now: Callable[[], float]
    log: Callable[[str], None]

    async def control(self, method: str, url: str, body: Any = None) -> Any:
        """A request to a control route (``/faults``, ``/_control/faults``): with the admin
        token."""
        headers = admin_authorization(self.mesh.environ)
        return await asyncio.to_thread(_http, method, url, body, 2.0, headers)

    async def partner_fault(self, partner: str, error_rate: float, status: int = 503) -> None:
        """Make one partner of the sandbox answer ``status`` to a share of its requests."""
        await self.control(
            "POST",
            f"http://{self.topology.sandbox_address()}/_control/faults",
            {"partner": partner, "error_rate": error_rate, "status": status},
        )


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
    """Seconds between the end of inject and heal."""
    inject: Action
    heal: Action
    """Ends the fault; for a kill, waits for the launcher to bring the member back."""
    prepare: Action | None = None
    """Runs before the fault's window (settlements made while the bank still answers)."""
    payment_path: bool = True
    """Whether payments pass through the faulted part; False (webhooks, the bank): payments
    must go on succeeding through the fault, which counts as outside the fault windows."""
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


def _kill9(name: str) -> tuple[Action, Action]:
    """kill -9 the member by its launcher pid; the heal only waits for the launcher."""

    async def inject(harness: Harness) -> None:
        await asyncio.to_thread(harness.mesh.kill, name)

    async def heal(harness: Harness) -> None:
        back = await asyncio.to_thread(harness.mesh.wait_back, name, COMEBACK_BOUND_S)
        harness.log(
            f"chaos: [{harness.now():6.1f}s] {name}: the launcher restarted it "
            f"(pid {back.old_pid} -> {back.new_pid}) after {_s(back.restarted_after_s)}, "
            f"SERVING after {_s(back.serving_after_s)}"
        )

    return inject, heal


def _signal(name: str, signum: signal.Signals) -> Action:
    async def send(harness: Harness) -> None:
        await asyncio.to_thread(harness.mesh.signal, name, signum)

    return send


def _partner_down(partner: str) -> tuple[Action, Action]:
    async def inject(harness: Harness) -> None:
        await harness.partner_fault(partner, 1.0)

    async def heal(harness: Harness) -> None:
        await harness.partner_fault(partner, 0.0)

    return inject, heal


def _service_latency(service: str, method: str, delay_ms: int) -> tuple[Action, Action]:
    async def inject(harness: Harness) -> None:
        await harness.control(
            "PUT",
            f"http://{harness.topology.admin_address(service)}/faults",
            [{"method": method, "delay_ms": delay_ms, "rate": 1.0}],
        )

    async def heal(harness: Harness) -> None:
        await harness.control("DELETE", f"http://{harness.topology.admin_address(service)}/faults")

    return inject, heal


def _settle(phase: str) -> Action:
    async def settle(harness: Harness) -> None:
        made = await harness.payouts.create(phase)
        harness.log(
            f"chaos: [{harness.now():6.1f}s] {len(made)} settlements {phase} the bank outage, "
            f"answered {sorted(collections.Counter(r.answered for r in made).items())}"
        )

    return settle


def _bank_down() -> tuple[Action, Action]:
    down, up = _partner_down("bank-transfer")
    during = _settle("during")

    async def inject(harness: Harness) -> None:
        await down(harness)
        await during(harness)  # created once; only the recovery loops may finish them

    return inject, up


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def all_faults() -> list[Fault]:
    """The faults of issues 7 and 15, in the order they run."""
    order_kill, order_back = _kill9("order-service")
    accounting_kill, accounting_back = _kill9("accounting-service")
    risk_slow, risk_fast = _service_latency("risk-service", "/paymesh.risk.v1.RiskService/*", 1500)
    channel_down, channel_up = _partner_down("payment-channel")
    webhooks_down, webhooks_up = _partner_down("merchant-webhooks")
    bank_down, bank_up = _bank_down()
    return [
        Fault(
            name="order_service_kill9",
            description="kill -9 order-service; the launcher restarts it",
            caller="payment-gateway",
            target="order-service",
            # Refused connections at 10 payments/s through the launcher's 1 s restart delay:
            # the consecutive-failures rule (5) opens it long before the member is back.
            expect_open=True,
            duration_s=0.0,
            inject=order_kill,
            heal=order_back,
        ),
        Fault(
            name="channel_adapter_sigstop",
            description="SIGSTOP channel-adapter for 15 s (deadline 5 s), then SIGCONT",
            caller="payment-gateway",
            target="channel-adapter",
            expect_open=True,
            duration_s=15.0,
            inject=_signal("channel-adapter", signal.SIGSTOP),
            heal=_signal("channel-adapter", signal.SIGCONT),
        ),
        Fault(
            name="risk_latency",
            description="+1500 ms on every RiskService call for 10 s (server-side /faults)",
            caller="payment-gateway",
            target="risk-service",
            expect_open=False,
            duration_s=10.0,
            inject=risk_slow,
            heal=risk_fast,
        ),
        Fault(
            name="payment_channel_503",
            description="the payment-channel partner answers 503 to everything for 12 s",
            caller="channel-adapter",
            target="payment-channel",
            expect_open=True,
            duration_s=12.0,
            inject=channel_down,
            heal=channel_up,
        ),
        Fault(
            name="accounting_restart",
            description="kill -9 accounting-service under load (mid-transaction); "
            "the launcher restarts it",
            caller="payment-gateway",
            target="accounting-service",
            expect_open=None,
            duration_s=0.0,
            inject=accounting_kill,
            heal=accounting_back,
        ),
        Fault(
            name="webhook_partner_down",
            description=f"the merchants' webhook endpoint answers 503 for {WEBHOOK_OUTAGE_S:g} s",
            caller="notification-service",
            target="merchant-webhooks",
            expect_open=True,
            duration_s=WEBHOOK_OUTAGE_S,
            inject=webhooks_down,
            heal=webhooks_up,
            payment_path=False,
        ),
        Fault(
            name="bank_partner_down",
            description=f"the bank partner answers 503 for {BANK_OUTAGE_S:g} s; settlements "
            "made just before and during it",
            caller="withdrawal-service",
            target="bank-transfer",
            expect_open=None,
            duration_s=BANK_OUTAGE_S,
            inject=bank_down,
            heal=bank_up,
            prepare=_settle("before"),
            payment_path=False,
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
    # Only calls that ended inside the window: one still running when the next fault began
    # (an in-flight call to a member stopped at the window's end) is that fault's.
    after = [a for a in creates if healed <= a.started and a.ended <= end]
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
        "last_failures_after": [
            {
                "started_s": round(a.started - start, 2),
                "ended_s": round(a.ended - start, 2),
                "code": a.code,
                "reason": a.reason,
            }
            for a in after
            if not a.succeeded
        ][-5:],
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
    addresses: dict[str, str],
    merchants: list[Merchant],
    operator: TransportSecurity,
    payouts: Payouts,
    timeout_s: float,
) -> dict[str, int]:
    """Wait for recovery to finish every payment, webhook and settlement; what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        payments = await gateway_payments(addresses["payment-gateway"], merchants, operator)
        notes = await notifications(addresses["notification-service"], merchants, operator)
        statuses = payouts.samples[-1].settlements if payouts.samples else {}
        left = {
            "payments": sum(1 for p in payments if p.status not in TERMINAL),
            "webhooks": sum(
                1 for n in notes if n.delivery_status == notification_pb2.DELIVERY_STATUS_PENDING
            ),
            "settlements": sum(
                1 for r in payouts.settlements if statuses.get(r.settlement_id) != COMPLETED
            ),
        }
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(1.0)


def check_comeback(comeback: Comeback) -> Check:
    """The launcher restarted the killed member, and it answered SERVING within the bound."""
    c = comeback
    passed = (
        c.new_pid is not None
        and c.restarts_after == c.restarts_before + 1
        and c.last_exit == "SIGKILL"
        and c.serving_after_s is not None
        and c.serving_after_s <= COMEBACK_BOUND_S
    )
    return Check(
        f"{c.name}: after kill -9 the launcher restarted it and it was SERVING again "
        f"within {COMEBACK_BOUND_S:g} s (nobody restarted it by hand)",
        passed,
        f"pid {c.old_pid} -> {c.new_pid}, restarts {c.restarts_before} -> {c.restarts_after}, "
        f"last exit {c.last_exit or '-'}; new process after {_s(c.restarted_after_s)}, "
        f"SERVING after {_s(c.serving_after_s)}",
    )


def check_launcher(report: LauncherReport, comebacks: list[Comeback]) -> Check:
    """At the end every member runs, none crash-loops, and only the killed ones restarted."""
    kills = dict(collections.Counter(c.name for c in comebacks))
    restarts = {m.name: m.restarts for m in report.members if m.restarts}
    down = [m.name for m in report.members if not m.running]
    looping = [m.name for m in report.members if m.crash_looping]
    return Check(
        "every member runs at the end under the launcher, none crash-looping, and only the "
        "killed ones were restarted",
        not down and not looping and restarts == kills,
        f"{len(report.members)} members; not running {down}; crash-looping {looping}; "
        f"restarts {restarts} (kills {kills})",
    )


def _prepare(out_dir: Path, open_s: float, window_s: float) -> tuple[Path, Path, Path]:
    """The report directory (absolute), its policy file, and an emptied var dir for the mesh."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    policy_file = out_dir / "policy.toml"
    write_policy(policy_file, open_s, window_s)
    var_dir = out_dir / "mesh"
    if var_dir.exists():
        shutil.rmtree(var_dir)
    return out_dir, policy_file, var_dir


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
    out_dir, policy_file, var_dir = _prepare(out_dir, open_s, window_s)
    environ = ephemeral_environ()
    environ[POLICY_FILE_VAR] = str(policy_file)
    environ.update({name: run_value for name, (run_value, _) in RUN_TIMINGS.items()})
    # The faults below switch /faults and the sandbox's /_control/faults: both need this.
    environ[FAULT_INJECTION_VAR] = "1"
    environ = with_admin_token(environ, var_dir)
    mesh = LaunchedMesh(environ, var_dir)
    topology = Topology(environ=mesh.environ)
    addresses = {name: m.address for name, m in mesh.members.items()}
    log(
        f"chaos: starting the mesh under its launcher (python -m services.tools.launcher, "
        f"{len(mesh.members)} processes), breaker open_s {open_s:g} s, window_s {window_s:g} s "
        "(deployed: 30 s, 60 s); "
        + ", ".join(f"{k}={v} (deployed {d})" for k, (v, d) in RUN_TIMINGS.items())
    )
    started = time.monotonic()
    launcher_code: int | None = None
    try:
        mesh.start(timeout_s=120)  # the launcher publishes its report once every member serves
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
        # Run seconds of the launcher's comebacks on the load's clock; wall time of second 0.
        mesh.now = load.now
        wall_zero = time.time() - load.now()
        payouts = Payouts(addresses, merchants, mesh.operator, load.now)
        harness = Harness(mesh, topology, payouts, load.now, log)
        poller = BreakerPoller(topology, {f.caller for f in faults}, load.now)
        stop_load, stop_poll, stop_samples = asyncio.Event(), asyncio.Event(), asyncio.Event()
        load_task = asyncio.create_task(load.run(stop_load))
        poll_task = asyncio.create_task(poller.run(stop_poll))
        sample_task = asyncio.create_task(payouts.run(stop_samples))
        log(
            f"chaos: load {creates_per_s:g} CreatePayment/s + {reads_per_s:g} reads/s, "
            f"{len(merchants)} merchants; the ledger sampled about once a second"
        )
        await asyncio.sleep(lead_s)
        for fault in faults:
            if fault.prepare is not None:
                await fault.prepare(harness)
            fault.times["start"] = load.now()
            log(f"chaos: [{load.now():6.1f}s] inject {fault.name}: {fault.description}")
            await fault.inject(harness)
            await asyncio.sleep(fault.duration_s)
            await fault.heal(harness)
            fault.times["healed"] = load.now()
            log(f"chaos: [{load.now():6.1f}s] healed {fault.name}")
            await asyncio.sleep(window_after)
            fault.times["end"] = load.now()
        stop_load.set()
        await load_task
        stop_poll.set()
        await poll_task
        duration = load.now()
        log(
            f"chaos: load stopped at {duration:.1f}s; waiting for recovery to finish payments, "
            "webhooks and settlements"
        )
        left = await _drain(addresses, merchants, mesh.operator, payouts, DRAIN_S)
        stop_samples.set()
        await sample_task
        log(f"chaos: left unfinished after the drain: {left}; checking invariants")

        checks = await check_money(
            addresses=addresses,
            sandbox_address=topology.sandbox_address(),
            merchants=merchants,
            record=load.record,
            operator=mesh.operator,
        )
        checks.append(check_deadlines(load.record))
        windows = [(f.times["start"], f.times["end"]) for f in faults if f.payment_path]
        checks.append(
            check_success_outside_faults(load.record, windows, MIN_SUCCESS_OUTSIDE_FAULTS)
        )
        per_fault = [
            evaluate_fault(f, load.record.attempts, poller, open_s, window_s) for f in faults
        ]
        for figures in per_fault:
            checks += figures.pop("_checks")

        # -- the launcher ------------------------------------------------------------
        checks += [check_comeback(c) for c in mesh.comebacks]
        launcher_report = await asyncio.to_thread(mesh.report)
        checks.append(check_launcher(launcher_report, mesh.comebacks))

        # -- the ledger and the payouts ----------------------------------------------
        checks.append(
            check_ledger_samples(payouts, payouts.samples[-1].t if payouts.samples else 0)
        )
        by_name = {f.name: f for f in faults}
        bank = by_name.get("bank_partner_down")
        withdrawals = await payouts.withdrawals()
        if bank is not None:
            checks += check_bank_outage(payouts, bank.times["start"], bank.times["healed"])
        if payouts.settlements:
            checks.append(
                check_settlements_completed(payouts, bank.times["healed"] if bank else None)
            )
            checks.append(
                check_payouts_at_end(
                    payouts,
                    withdrawals,
                    await _bank_payout_entries(addresses, mesh.operator),
                    topology.sandbox_address(),
                )
            )

        # -- webhooks ----------------------------------------------------------------
        payments = await gateway_payments(addresses["payment-gateway"], merchants, mesh.operator)
        notes = await notifications(addresses["notification-service"], merchants, mesh.operator)
        deliveries = await asyncio.to_thread(received, topology.sandbox_address())
        checks += check_webhooks(
            notes,
            deliveries,
            payments,
            {r.settlement_id for r in payouts.settlements},
            {w.withdrawal_id for w in withdrawals},
        )
        webhook_figures = _webhook_figures(
            notes, deliveries, await asyncio.to_thread(requests_seen, topology.sandbox_address())
        )
        hooks = by_name.get("webhook_partner_down")
        if hooks is not None:
            outage = outage_figures(
                notes,
                deliveries,
                down_wall=wall_zero + hooks.times["start"],
                healed_wall=wall_zero + hooks.times["healed"],
            )
            webhook_figures["outage"] = outage
            checks.append(
                Check(
                    "webhook_partner_down: the events of the outage were delivered after it "
                    "ended, none while it lasted",
                    outage["backlog"] > 0
                    and outage["backlog_delivered"] == outage["backlog"]
                    and outage["delivered_before_heal"] == 0,
                    f"{outage['backlog']} events created during the outage, "
                    f"{outage['backlog_delivered']} delivered, "
                    f"{outage['delivered_before_heal']} of them before the heal; all within "
                    f"{outage['all_delivered_after_heal_s']} s of the heal",
                )
            )
            for figures in per_fault:
                if figures["name"] == hooks.name:
                    figures["webhooks"] = outage
    finally:
        launcher_code = await asyncio.to_thread(mesh.stop)
    checks.append(
        Check(
            "the launcher stopped the mesh cleanly on SIGTERM (every member exited 0)",
            launcher_code == 0,
            f"launcher exit code {launcher_code}; its log: {mesh.log_path}",
        )
    )
    runs = load.record.payments
    creates = [a for a in load.record.attempts if a.kind == "create"]
    settlement_figures = _settlement_figures(payouts, withdrawals, bank)
    for figures in per_fault:
        if bank is not None and figures["name"] == bank.name:
            figures["settlements"] = settlement_figures
    report: dict[str, Any] = {
        "policy": {
            "file": str(policy_file),
            "breaker_open_s": open_s,
            "breaker_window_s": window_s,
            "environment": {k: v for k, (v, _) in RUN_TIMINGS.items()},
            "deployed": {k: d for k, (_, d) in RUN_TIMINGS.items()},
            "others": "as deployed (services/mesh/policy.toml and the services' defaults)",
        },
        "load": {
            "creates_per_s": creates_per_s,
            "reads_per_s": reads_per_s,
            "payments": len(runs),
            "succeeded": sum(1 for r in runs if r.final == "PAYMENT_STATUS_SUCCEEDED"),
            "finals": _count(r.final for r in runs),
            "client_attempts": len(load.record.attempts),
            "create_attempts": len(creates),
            "create_answers": _count(
                a.outcome if a.ok else f"{a.code}:{a.reason or '-'}" for a in creates
            ),
            "transient_unavailable_retried": sum(r.transient for r in runs),
            "transient_unavailable_kept_pending": sum(r.transient_kept for r in runs),
            "errors_without_error_info": [
                {"t": round(a.started, 2), "code": a.code, "detail": a.detail}
                for a in creates
                if not a.ok and not a.reason
            ][:30],
            "mean_attempts_per_payment": statistics.fmean(r.attempts for r in runs) if runs else 0,
        },
        "wall_s": round(time.monotonic() - started, 1),
        "faults": per_fault,
        "launcher": {
            "exit_code": launcher_code,
            "restart_bound_s": COMEBACK_BOUND_S,
            "restarts": {m.name: m.restarts for m in launcher_report.members if m.restarts},
            "comebacks": [c.as_dict() for c in mesh.comebacks],
        },
        "webhooks": webhook_figures,
        "settlements": settlement_figures,
        "drain_left": left,
        "invariants": [c.as_dict() for c in checks],
        "passed": all(c.passed for c in checks),
        "timeline": timeline(load.record.attempts, duration),
        "webhook_timeline": _webhook_timeline(notes, deliveries, wall_zero, duration),
        "ledger_samples": [s.as_dict() for s in payouts.samples],
        "ledger_samples_missed": payouts.missed,
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


async def _bank_payout_entries(addresses: dict[str, str], operator: TransportSecurity) -> list[Any]:
    """Every entry of platform/bank_payouts (one per payout the bank confirmed)."""
    async with operator.aio_channel("accounting-service", addresses["accounting-service"]) as ch:
        stub = accounting_pb2_grpc.AccountingServiceStub(ch)
        return await pages(
            stub.ListEntries,
            accounting_pb2.ListEntriesRequest(account_id=accounts.BANK_PAYOUTS, page_size=500),
            "entries",
        )


def _webhook_figures(
    notes: list[Any], deliveries: list[dict[str, Any]], requests: int
) -> dict[str, Any]:
    accepted = sum(int(d.get("accepted", 1)) for d in deliveries)
    return {
        "events": len(notes),
        "delivered": sum(
            1 for n in notes if n.delivery_status == notification_pb2.DELIVERY_STATUS_DELIVERED
        ),
        "received_at_receiver": len(deliveries),
        "accepted_deliveries": accepted,
        "duplicates_at_receiver": accepted - len(deliveries),
        "requests_at_partner": requests,
        "refused_by_partner": requests - accepted,
        "by_event_type": _count(n.event_type for n in notes),
        "attempts_at_notification_service": sum(n.attempt_count for n in notes),
    }


def _webhook_timeline(
    notes: list[Any], deliveries: list[dict[str, Any]], wall_zero: float, duration: float
) -> list[dict[str, Any]]:
    """Per second: events created so far and delivered so far (cumulative)."""
    created = sorted(n.create_time.ToNanoseconds() / 1e9 - wall_zero for n in notes)
    delivered = sorted(wall_time(d["received_at"]) - wall_zero for d in deliveries)
    rows = []
    for s in range(int(duration) + 1):
        rows.append(
            {
                "t": s,
                "created": sum(1 for t in created if t < s + 1),
                "delivered": sum(1 for t in delivered if t < s + 1),
            }
        )
    return rows


def _settlement_figures(
    payouts: Payouts, withdrawals: list[Any], bank: Fault | None
) -> dict[str, Any]:
    runs = payouts.settlements
    healed = bank.times.get("healed") if bank is not None else None
    after = [
        round(r.completed_at - healed, 2)
        for r in runs
        if r.phase == "during" and r.completed_at is not None and healed is not None
    ]
    return {
        "total": len(runs),
        "by_phase": _count(r.phase for r in runs),
        "answered": _count(f"{r.phase}:{r.answered}" for r in runs),
        "completed": sum(1 for r in runs if r.final == COMPLETED),
        "completed_after_heal_s": sorted(after),
        "withdrawals": len(withdrawals),
        "withdrawals_completed": sum(
            1 for w in withdrawals if w.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
        ),
        "paid_out_minor": sum(r.amount_minor for r in runs if r.final == COMPLETED),
        "runs": [r.as_dict() for r in runs],
    }


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts
