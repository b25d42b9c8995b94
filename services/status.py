"""``make status``: every service's health and each outgoing edge's breaker, errors, p99, retries.

Asks each service of the topology (addresses overridable by environment, as everywhere) for
its liveness, its readiness and its Diagnostics report, all at once, and prints one table;
``--json`` prints the same for scripts, ``--watch [seconds]`` refreshes until Ctrl-C. A service
that does not answer is shown as DOWN. Exit status: 0 when every service serves, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import duration_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.launcher import render_table
from services.tls import TlsConfigError, TransportSecurity, operator_security
from services.topology import Topology, TopologyError

#: How long one service may take to answer health; Diagnostics checks its own dependencies
#: (a second at most each, concurrently), so it gets more.
HEALTH_TIMEOUT_S = 1.0
DIAGNOSTICS_TIMEOUT_S = 3.0
DOWN = "DOWN"
NOT_READY = "NOT_READY"
SERVING = "SERVING"

_BREAKERS = {
    mesh_pb2.BREAKER_STATE_UNSPECIFIED: "-",
    mesh_pb2.BREAKER_STATE_CLOSED: "closed",
    mesh_pb2.BREAKER_STATE_HALF_OPEN: "HALF-OPEN",
    mesh_pb2.BREAKER_STATE_OPEN: "OPEN",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus:
    """One service: whether it answers, and its report."""

    name: str
    """Topology name."""
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
    )


async def _health(channel: aio.Channel, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=HEALTH_TIMEOUT_S
        )
    except aio.AioRpcError as exc:
        return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def service_status(
    topology: Topology, name: str, security: TransportSecurity | None = None
) -> ServiceStatus:
    """Ask one service for its health and its Diagnostics report; never raises for a dead one.

    The call is made as the operator identity (``security``; default: the operator of
    ``topology``'s environment), the only identity granted Diagnostics.
    """
    spec = topology.service(name)
    address = topology.address(name)
    security = security or operator_security(topology.environ)
    async with security.aio_channel(name, address) as channel:
        liveness, readiness = await asyncio.gather(
            _health(channel, ""), _health(channel, spec.proto_services[0])
        )
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
        error, edges = "", tuple[EdgeStatus, ...]()
        try:
            report = await stub.GetDiagnostics(
                mesh_pb2.GetDiagnosticsRequest(), timeout=DIAGNOSTICS_TIMEOUT_S
            )
            edges = tuple(edge_status(d) for d in report.dependencies)
        except aio.AioRpcError as exc:
            error = f"diagnostics: {exc.code().name}: {exc.details() or ''}"
    return ServiceStatus(
        name=name,
        address=address,
        health=SERVING if readiness == SERVING else NOT_READY,
        liveness=liveness,
        readiness=readiness,
        error=error,
        edges=edges,
    )


async def mesh_status(
    topology: Topology, security: TransportSecurity | None = None
) -> list[ServiceStatus]:
    """Every service of the topology, asked concurrently, in topology order."""
    security = security or operator_security(topology.environ)
    return list(
        await asyncio.gather(
            *(service_status(topology, s.name, security) for s in topology.services)
        )
    )


HEADER = (
    "SERVICE",
    "ADDRESS",
    "HEALTH",
    "EDGE",
    "DEP HEALTH",
    "BREAKER",
    "ERRORS",
    "P99",
    "RETRIES/S",
    "LAST ERROR",
)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render(statuses: Sequence[ServiceStatus]) -> str:
    """The table: one row per edge, the service's columns on its first row only."""
    rows: list[tuple[str, ...]] = []
    for status in statuses:
        head = (status.name, status.address, status.health)
        if not status.edges:
            note = _short(status.error) if status.error else ""
            rows.append((*head, "(no dependencies)" if not note else "", *("",) * 5, note))
            continue
        for index, edge in enumerate(status.edges):
            called = edge.kind in ("service", "partner")
            rows.append(
                (
                    *(head if index == 0 else ("", "", "")),
                    f"-> {edge.name}" if called else f"   {edge.name}",
                    edge.health,
                    edge.breaker,
                    f"{edge.error_rate:.0%}" if called and edge.recent_calls else "-",
                    f"{edge.p99_ms}ms" if called and edge.recent_calls else "-",
                    f"{edge.retries_per_s:.1f}" if called else "-",
                    _short(edge.last_error),
                )
            )
    return render_table(rows, HEADER)


def as_json(statuses: Sequence[ServiceStatus]) -> dict[str, Any]:
    """The same as a JSON-ready dict."""
    return {"time": time.time(), "services": [asdict(s) for s in statuses]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.status",
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


def _show(statuses: Sequence[ServiceStatus], *, as_json_lines: bool, watching: bool) -> None:
    if as_json_lines:
        print(json.dumps(as_json(statuses), sort_keys=True), flush=True)
        return
    if watching and sys.stdout.isatty():
        print("\033[H\033[2J", end="")  # clear the screen, like watch(1)
    stamp = time.strftime("%H:%M:%S")
    print(f"paymesh status at {stamp}\n{render(statuses)}", flush=True)


async def _run(topology: Topology, args: argparse.Namespace) -> int:
    while True:
        statuses = await mesh_status(topology)
        _show(statuses, as_json_lines=args.json, watching=args.watch is not None)
        if args.watch is None:
            return 0 if all(s.health == SERVING for s in statuses) else 1
        await asyncio.sleep(args.watch)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m services.status``."""
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
