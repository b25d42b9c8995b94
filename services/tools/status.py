"""``make status``: a summary line, then every service's health, restarts and outgoing edges.

Asks each service of the topology (addresses overridable by environment, as everywhere) for
its liveness, its readiness and its Diagnostics report, all services at once, as the operator
through the policy chain's sync adapter (grpc-interceptor over the one attempt loop); reads
the restarts the running launcher (``make run``) keeps in ``<var>/launcher.json``, and prints
one table that fits 120 columns (an edge's last error wrapped under it); ``--json`` prints
the same for scripts, ``--watch [seconds]`` refreshes until Ctrl-C. A service that does not
answer is DOWN. A service whose address lists several replicas gets a row per replica
(``payment-gateway``, ``payment-gateway#1``, ...), each asked at its own endpoint.
Exit status: 0 whenever it could report, whatever the mesh's state; 2 when it could not (bad
configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interceptors.chain import ClientChain, build_client_chain
from interceptors.errors import CallError
from interceptors.policy import PolicyConfig
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.mesh import pki
from services.mesh.tls import TlsConfigError, TransportSecurity, operator_security
from services.mesh.topology import Topology, TopologyError
from services.tools.replicas import member_name, service_of
from services.tools.supervisor import LAUNCHER_FILE, LauncherReport, MemberReport, read_report

#: How long one service may take to answer health; Diagnostics checks its own dependencies
#: (a second at most each, concurrently), so it gets more.
HEALTH_TIMEOUT_S = 1.0
DIAGNOSTICS_TIMEOUT_S = 3.0
DOWN = "DOWN"
NOT_READY = "NOT_READY"
SERVING = "SERVING"
#: The table and every line around it fit this many columns.
WIDTH = 120
#: Lines of an edge's last error at most; the rest is cut.
ERROR_LINES = 2

_BREAKERS = {
    mesh_pb2.BREAKER_STATE_UNSPECIFIED: "-",
    mesh_pb2.BREAKER_STATE_CLOSED: "closed",
    mesh_pb2.BREAKER_STATE_HALF_OPEN: "HALF-OPEN",
    mesh_pb2.BREAKER_STATE_OPEN: "OPEN",
    mesh_pb2.BREAKER_STATE_HALF_OPEN_READY: "HALF-OPEN-READY",
}
#: Breaker names that are no breaker, or a closed one.
_NOT_OPEN = frozenset({"-", "closed"})
_OVERALL = {
    mesh_pb2.SERVICE_STATUS_SERVING: SERVING,
    mesh_pb2.SERVICE_STATUS_DEGRADED: "DEGRADED",
    mesh_pb2.SERVICE_STATUS_NOT_SERVING: "NOT_SERVING",
}
_HEALTH = {
    mesh_pb2.DEPENDENCY_HEALTH_UNSPECIFIED: "-",
    mesh_pb2.DEPENDENCY_HEALTH_SERVING: SERVING,
    mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING: "NOT_SERVING",
    mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE: "UNREACHABLE",
}
_KINDS = {
    mesh_pb2.DEPENDENCY_KIND_GRPC_SERVICE: "service",
    mesh_pb2.DEPENDENCY_KIND_HTTP_PARTNER: "partner",
    mesh_pb2.DEPENDENCY_KIND_DATABASE: "database",
    mesh_pb2.DEPENDENCY_KIND_CACHE: "cache",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeStatus:
    """One dependency of a service as that service reports it."""

    name: str
    """Topology name of the dependency (``order-service``, ``geo-ip``, ``database``)."""
    kind: str
    """``service``, ``partner``, ``database`` or ``cache``."""
    target: str
    """Address, URL or file the service uses."""
    health: str
    """The dependency's own answer: SERVING, NOT_SERVING or UNREACHABLE."""
    breaker: str
    """This caller's breaker: ``closed``, ``HALF-OPEN``, ``OPEN``, or ``-`` when there is none."""
    recent_calls: int
    """Calls in the recent window."""
    error_rate: float
    """Share of those that failed (0.0 to 1.0)."""
    p99_ms: int
    """99th percentile latency of those calls, in milliseconds."""
    retries_per_s: float
    """Retries per second over the window."""
    last_error: str
    """Most recent error, empty if none."""
    last_error_time: str
    """When it happened (ISO 8601, UTC), empty if none."""
    window_s: float = 0.0
    """Seconds the recent figures cover (a minute, less just after the caller started)."""
    p50_ms: int = 0
    """Median latency of those calls, in milliseconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus:
    """One service: whether it answers, and its report."""

    name: str
    """Topology name; a replica after the first: ``<name>#<k>``, as the launcher names it."""
    address: str
    """``host:port`` asked."""
    health: str
    """SERVING, NOT_READY (alive, but its own database is not), or DOWN."""
    liveness: str
    """Its grpc.health.v1 answer for ``""``, or the error code when it did not answer."""
    readiness: str
    """Its answer for its own proto service, or the error code."""
    error: str = ""
    """Why the report is missing, when it is."""
    edges: tuple[EdgeStatus, ...] = field(default_factory=tuple)
    """Its dependencies, in topology order."""
    overall: str = ""
    """Its Diagnostics status: SERVING, DEGRADED or NOT_SERVING; empty without a report."""
    status_reason: str = ""
    """Why that status is not SERVING."""
    restarts: int | None = None
    """Times the launcher restarted it; None when no running launcher reports it."""
    last_exit: str = ""
    """How its last process ended (``exit 2``, ``SIGKILL``); empty if none did."""
    last_exit_time: str = ""
    """When (ISO 8601, UTC); empty if never."""
    crash_looping: bool = False
    """Whether the launcher reports it crash-looping."""
    next_restart_in_s: float | None = None
    """Seconds until the launcher restarts it, while it waits for that."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """The first line of the report."""

    services: int
    """Services of the topology."""
    serving: int
    """Of those, ready ones (SERVING or DEGRADED)."""
    open_breakers: tuple[str, ...]
    """Edges whose breaker is not closed (open, half-open-ready, half-open): ``caller ->
    target``."""
    crash_looping: tuple[str, ...]
    """Members (services or the partner sandbox) the launcher reports crash-looping."""
    launcher: str
    """``running``, ``none`` (no launcher.json), ``stale`` (its launcher is gone), or
    ``unreadable``."""


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def edge_status(dependency: mesh_pb2.Dependency) -> EdgeStatus:
    """The status view of one Diagnostics entry."""
    window_s = _seconds(dependency.recent_window)
    return EdgeStatus(
        name=dependency.name,
        kind=_KINDS.get(dependency.kind, "unknown"),
        target=dependency.target,
        health=_HEALTH.get(dependency.health, "-"),
        breaker=_BREAKERS.get(dependency.breaker_state, "-"),
        recent_calls=dependency.recent_call_count,
        error_rate=dependency.error_rate_bps / 10_000,
        p99_ms=dependency.p99_latency_ms,
        retries_per_s=dependency.recent_retry_count / window_s if window_s > 0 else 0.0,
        last_error=dependency.last_error,
        last_error_time=(
            dependency.last_error_time.ToJsonString()
            if dependency.HasField("last_error_time")
            else ""
        ),
        window_s=window_s,
        p50_ms=dependency.p50_latency_ms,
    )


def _health(channel: grpc.Channel, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=HEALTH_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code().name if isinstance(exc, CallError | grpc.Call) else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def tool_chain() -> ClientChain:
    """The operator's policy chain for one status round (the sync adapter over the one loop).

    Made afresh each round, so a service that came back shows at once, not after an open
    breaker's time.
    """
    return build_client_chain(caller=pki.OPERATOR, config=PolicyConfig.load())


def replicas_of(topology: Topology, service: str) -> list[tuple[str, str]]:
    """The rows a service gets: (name, address) of each listed replica; one row for a single
    endpoint or a DNS name (whichever replica the name resolves to answers)."""
    dial = topology.dial(service)
    if dial.dns:
        return [(service, dial.target)]
    return [(member_name(service, k), endpoint) for k, endpoint in enumerate(dial.endpoints)]


async def service_status(
    topology: Topology,
    name: str,
    security: TransportSecurity | None = None,
    chain: ClientChain | None = None,
    *,
    address: str | None = None,
) -> ServiceStatus:
    """Ask one service (or one replica: ``name`` ``<service>#<k>`` at ``address``) for its
    health and its Diagnostics report; never raises for a dead one.

    The call is made as the operator identity (``security``; default: the operator of
    ``topology``'s environment), the only identity granted Diagnostics, through ``chain``'s
    sync interceptors (default: :func:`tool_chain`), in a thread.
    """
    security = security or operator_security(topology.environ)
    address = address or replicas_of(topology, name)[0][1]
    return await asyncio.to_thread(
        _service_status, topology, name, address, security, chain or tool_chain()
    )


def _service_status(
    topology: Topology, name: str, address: str, security: TransportSecurity, chain: ClientChain
) -> ServiceStatus:
    service = service_of(name)
    spec = topology.service(service)
    with security.sync_channel(service, address, options=chain.channel_options()) as plain:
        # Per replica (its own breaker): one replica down leaves its peers' rows intact.
        channel = grpc.intercept_channel(plain, *chain.sync_interceptors(name))
        liveness, readiness = _health(channel, ""), _health(channel, spec.proto_services[0])
        if liveness != SERVING:
            return ServiceStatus(
                name=name,
                address=address,
                health=DOWN,
                liveness=liveness,
                readiness=readiness,
                error=f"health check: {liveness}",
            )
        stub = mesh_pb2_grpc.DiagnosticsServiceStub(channel)
        error, edges, overall, reason = "", tuple[EdgeStatus, ...](), "", ""
        try:
            report = stub.GetDiagnostics(
                mesh_pb2.GetDiagnosticsRequest(), timeout=DIAGNOSTICS_TIMEOUT_S
            )
            edges = tuple(edge_status(d) for d in report.dependencies)
            overall, reason = _OVERALL.get(report.status, ""), report.status_reason
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, CallError | grpc.Call) else "UNKNOWN"
            details = exc.details() if isinstance(exc, CallError | grpc.Call) else str(exc)
            error = f"diagnostics: {code}: {details or ''}"
    return ServiceStatus(
        name=name,
        address=address,
        health=SERVING if readiness == SERVING else NOT_READY,
        liveness=liveness,
        readiness=readiness,
        error=error,
        edges=edges,
        overall=overall,
        status_reason=reason,
    )


async def mesh_status(
    topology: Topology, security: TransportSecurity | None = None
) -> list[ServiceStatus]:
    """Every service (every replica) of the topology, asked concurrently (one chain), in
    topology order."""
    security = security or operator_security(topology.environ)
    chain = tool_chain()
    rows = [row for s in topology.services for row in replicas_of(topology, s.name)]
    return list(
        await asyncio.gather(
            *(
                service_status(topology, name, security, chain, address=address)
                for name, address in rows
            )
        )
    )


def launcher_path(topology: Topology) -> Path:
    """Where the launcher of this environment reports: ``<PAYMESH_VAR_DIR>/launcher.json``."""
    return Path(topology.environ.get("PAYMESH_VAR_DIR", "var")) / LAUNCHER_FILE


def read_launcher(path: Path, *, now: float | None = None) -> tuple[LauncherReport | None, str]:
    """The running launcher's report and the summary's word for it (see :class:`Summary`)."""
    try:
        report = read_report(path)
    except (OSError, ValueError):
        return None, "unreadable"
    if report is None:
        return None, "none"
    if not report.is_current(time.time() if now is None else now):
        return None, "stale"
    return report, "running"


def _iso(epoch_s: float | None) -> str:
    if epoch_s is None:
        return ""
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="seconds")


def with_replicas(topology: Topology, report: LauncherReport | None) -> Topology:
    """``topology`` with each service's address listing the replicas the launcher runs
    (``<service>#<k>`` members), when its first replica is at the address the topology names."""
    if report is None:
        return topology
    extra: dict[str, list[str]] = {}
    for member in report.members:
        service = service_of(member.name)
        if member.name != service and service in {s.name for s in topology.services}:
            extra.setdefault(service, []).append(member.address)
    environ = dict(topology.environ)
    for service, addresses in extra.items():
        first = topology.address(service)
        if "," not in first and not first.startswith("dns:"):
            environ[topology.service(service).addr_var] = ",".join([first, *addresses])
    return Topology(services=topology.services, partners=topology.partners, environ=environ)


def with_launcher(
    statuses: Sequence[ServiceStatus], report: LauncherReport | None
) -> list[ServiceStatus]:
    """``statuses`` with restarts from ``report``; only members at the address asked count."""
    members = {m.name: m for m in report.members} if report else {}
    out = []
    for status in statuses:
        member = members.get(status.name)
        if member is None or member.address != status.address:
            out.append(status)
            continue
        out.append(
            dataclasses.replace(
                status,
                restarts=member.restarts,
                last_exit=member.last_exit,
                last_exit_time=_iso(member.last_exit_time),
                crash_looping=member.crash_looping,
                next_restart_in_s=member.next_restart_in_s,
            )
        )
    return out


def summarize(
    statuses: Sequence[ServiceStatus], report: LauncherReport | None, launcher: str
) -> Summary:
    """The summary of ``statuses`` (with restarts applied) and of the launcher's members."""
    by_service = {s.name: s for s in statuses}

    def ours(member: MemberReport) -> bool:
        status = by_service.get(member.name)
        return status is None or status.address == member.address

    return Summary(
        services=len(statuses),
        serving=sum(1 for s in statuses if s.health == SERVING),
        open_breakers=tuple(
            f"{s.name} -> {e.name}" for s in statuses for e in s.edges if e.breaker not in _NOT_OPEN
        ),
        crash_looping=tuple(
            m.name for m in (report.members if report else ()) if m.crash_looping and ours(m)
        ),
        launcher=launcher,
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def summary_line(summary: Summary, stamp: str) -> str:
    """``paymesh status at HH:MM:SS: n/N serving, ...``; names are dropped that do not fit."""
    head = f"paymesh status at {stamp}: {summary.serving}/{summary.services} serving"
    breakers = _plural(len(summary.open_breakers), "open breaker")
    looping = f"{len(summary.crash_looping)} crash-looping"
    parts = [
        head,
        breakers + (f" ({', '.join(summary.open_breakers)})" if summary.open_breakers else ""),
        looping + (f" ({', '.join(summary.crash_looping)})" if summary.crash_looping else ""),
    ]
    # Too long: the breakers' names go first, then the crash-looping ones (they matter more).
    for index, short in ((1, breakers), (2, looping)):
        if len(", ".join(parts)) <= WIDTH:
            break
        parts[index] = short
    return ", ".join(parts)[:WIDTH]


#: The line under the summary when no running launcher reports restarts.
LAUNCHER_NOTES = {
    "none": "restarts: unknown, no launcher.json (the mesh was not started by make run)",
    "stale": "restarts: unknown, launcher.json is stale (the launcher that wrote it is gone)",
    "unreadable": "restarts: unknown, launcher.json is unreadable",
}


HEADER = (
    "SERVICE / EDGE",
    "HEALTH",
    "BREAKER",
    "ERRORS",
    "P99",
    "RETRY/S",
    "RESTARTS",
    "LAST EXIT",
)


def _clock_time(iso: str) -> str:
    if not iso:
        return ""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return iso


def _ago(iso: str, now: float) -> str:
    try:
        seconds = max(0.0, now - datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _note(text: str, *, indent: int = 6, lines: int = ERROR_LINES) -> list[str]:
    return textwrap.wrap(
        " ".join(text.split()),
        width=WIDTH,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 2),
        max_lines=lines,
        placeholder=" ...",
    )


Line = tuple[str, ...] | str  # a table row, or a note printed as it is


def _service_lines(status: ServiceStatus, now: float) -> list[Line]:
    health = status.health if status.health != SERVING else (status.overall or SERVING)
    last_exit = _cut(status.last_exit, 16)
    if status.last_exit_time:
        last_exit += f" {_clock_time(status.last_exit_time)}"
    restarts = "-" if status.restarts is None else str(status.restarts)
    lines: list[Line] = [(status.name, health, "", "", "", "", restarts, last_exit or "-")]
    if status.crash_looping:
        due = status.next_restart_in_s
        when = f"; next restart in {due:.0f} s" if due is not None else ""
        lines += _note(f"CRASH-LOOPING: last exit {status.last_exit}{when}", lines=1)
    if status.error:
        lines += _note(f"{status.error} (at {status.address})", lines=1)
    if not status.edges and not status.error:
        lines.append(("  (no dependencies)", *("",) * 7))
    for edge in status.edges:
        called = edge.kind in ("service", "partner")
        lines.append(
            (
                f"  -> {edge.name}" if called else f"     {edge.name}",
                edge.health,
                edge.breaker,
                f"{edge.error_rate:.0%}" if called and edge.recent_calls else "-",
                f"{edge.p99_ms}ms" if called and edge.recent_calls else "-",
                f"{edge.retries_per_s:.1f}" if called else "-",
                "",
                "",
            )
        )
        if edge.last_error:
            when = ""
            if edge.last_error_time:
                when = (
                    f" at {_clock_time(edge.last_error_time)} ({_ago(edge.last_error_time, now)})"
                )
            lines += _note(f"last error{when}: {edge.last_error}", indent=8)
    return lines


def render(
    statuses: Sequence[ServiceStatus],
    summary: Summary | None = None,
    *,
    now: float | None = None,
) -> str:
    """The summary line (and a note when no launcher reports restarts), then one row per
    service and per edge, each line at most 120 wide."""
    now = time.time() if now is None else now
    summary = summary or summarize(statuses, None, "none")
    lines: list[Line] = [line for status in statuses for line in _service_lines(status, now)]
    rows = [HEADER, *(line for line in lines if isinstance(line, tuple))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def aligned(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    out = [summary_line(summary, stamp)]
    if summary.launcher in LAUNCHER_NOTES:
        out.append(LAUNCHER_NOTES[summary.launcher])
    out += [aligned(HEADER), "  ".join("-" * w for w in widths)]
    out += [aligned(line) if isinstance(line, tuple) else line for line in lines]
    return "\n".join(line[:WIDTH] for line in out)


def as_json(
    statuses: Sequence[ServiceStatus],
    summary: Summary | None = None,
    report: LauncherReport | None = None,
) -> dict[str, Any]:
    """The same as a JSON-ready dict: summary, the launcher's report, every service."""
    summary = summary or summarize(statuses, report, "none")
    return {
        "time": time.time(),
        "summary": asdict(summary),
        "launcher": report.to_json() if report else None,
        "services": [asdict(s) for s in statuses],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.tools.status",
        description="Health of every service and of each outgoing edge of the mesh.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (one line per refresh)")
    parser.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    return parser


def _show(
    statuses: Sequence[ServiceStatus],
    summary: Summary,
    report: LauncherReport | None,
    *,
    as_json_lines: bool,
    watching: bool,
) -> None:
    if as_json_lines:
        print(json.dumps(as_json(statuses, summary, report), sort_keys=True), flush=True)
        return
    if watching and sys.stdout.isatty():
        print("\033[H\033[2J", end="")  # clear the screen, like watch(1)
    print(render(statuses, summary), flush=True)


async def report_once(
    topology: Topology,
) -> tuple[list[ServiceStatus], Summary, LauncherReport | None]:
    """Ask every service (and every replica the running launcher reports) and read the
    launcher's report: the statuses and their summary."""
    report, launcher = read_launcher(launcher_path(topology))
    statuses = await mesh_status(with_replicas(topology, report))
    statuses = with_launcher(statuses, report)
    return statuses, summarize(statuses, report, launcher), report


async def _run(topology: Topology, args: argparse.Namespace) -> int:
    while True:
        statuses, summary, report = await report_once(topology)
        _show(statuses, summary, report, as_json_lines=args.json, watching=args.watch is not None)
        if args.watch is None:
            return 0  # it could report: what it found is in the report, not the exit status
        await asyncio.sleep(args.watch)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.tools.status``."""
    args = _parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        print("status: --watch takes a positive number of seconds", file=sys.stderr)
        return 2
    try:
        topology = Topology()
        operator_security(topology.environ).check()
    except (TopologyError, TlsConfigError) as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(topology, args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
