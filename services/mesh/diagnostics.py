"""The dependency report of every service (Diagnostics RPC) and the readiness of its database.

Each dependency is asked for its own health directly, with a short timeout and never through
the policy chain (a check must not trip, or be refused by, the breaker it reports on); the
breaker state and recent figures are this caller's, and the report's overall status follows
from them. Liveness (health ``""``) stays the process's own; the service's own health entries
follow its database; ``/healthz`` (:func:`process_health`) checks the process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interceptors.breaker import CLOSED, HALF_OPEN, HALF_OPEN_READY, OPEN
from interceptors.errors import CallError, NotFoundError, wrap_errors
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.mesh.recent import RecentCalls
from services.mesh.topology import ServiceSpec, Topology
from services.storage import sql
from services.storage.shared_state import SharedState

log = logging.getLogger("paymesh.diagnostics")

DIAGNOSTICS_SERVICE = mesh_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
#: How long one dependency's health check may take; a report never waits longer.
PROBE_TIMEOUT_S = 1.0
#: How often the own database is checked for readiness.
READINESS_INTERVAL_S = 5.0
#: ``/healthz`` fails when the event loop takes longer than this to come back to a task that
#: yields (``PAYMESH_HEALTHZ_MAX_LAG_S``).
HEALTHZ_MAX_LAG_S = 1.0
HEALTHZ_MAX_LAG_VAR = "PAYMESH_HEALTHZ_MAX_LAG_S"
DATABASE = "database"
#: The name of the Redis entry in Diagnostics and health (``REDIS_URL``).
REDIS = "redis"

_BREAKER_STATES = {
    CLOSED: mesh_pb2.BREAKER_STATE_CLOSED,
    HALF_OPEN: mesh_pb2.BREAKER_STATE_HALF_OPEN,
    OPEN: mesh_pb2.BREAKER_STATE_OPEN,
    HALF_OPEN_READY: mesh_pb2.BREAKER_STATE_HALF_OPEN_READY,
}
_BREAKER_NAMES = {
    mesh_pb2.BREAKER_STATE_HALF_OPEN: "HALF-OPEN",
    mesh_pb2.BREAKER_STATE_OPEN: "OPEN",
    mesh_pb2.BREAKER_STATE_HALF_OPEN_READY: "HALF-OPEN-READY",
}


class Health(enum.IntEnum):
    """A dependency's answer to a health check (the proto's DependencyHealth values)."""

    SERVING = mesh_pb2.DEPENDENCY_HEALTH_SERVING
    NOT_SERVING = mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING
    UNREACHABLE = mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE


async def check_database(
    path: sql.Target, *, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[Health, str]:
    """``SELECT 1`` on the SQLite file or PostgreSQL URL: its health and the error, if any."""
    try:
        await asyncio.wait_for(asyncio.to_thread(sql.probe, path, timeout_s), timeout_s)
    except TimeoutError:
        return Health.UNREACHABLE, f"no answer from {sql.describe(path)} within {timeout_s:.1f}s"
    except sql.DatabaseError as exc:
        return Health.NOT_SERVING, f"{type(exc).__name__}: {exc}"
    return Health.SERVING, ""


async def check_redis(shared: SharedState) -> tuple[Health, str]:
    """PING on the shared state's Redis: its health and the error, if any."""
    error = await shared.ping()
    return (Health.UNREACHABLE, error) if error else (Health.SERVING, "")


async def check_partner(
    base_url: str,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    session: aiohttp.ClientSession | None = None,
) -> tuple[Health, str]:
    """``GET <base_url>/healthz``: any answer below 500 means the partner is up.

    ``session`` is the caller's (None: one for this check only); no proxy is taken from the
    environment, and the body is not read.
    """
    url = f"{base_url.rstrip('/')}/healthz"
    own = session is None
    session = session or _probe_session()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url) as reply:
                status = reply.status
    except TimeoutError:
        return Health.UNREACHABLE, f"no answer from {url} within {timeout_s:.1f}s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Health.UNREACHABLE, f"{url}: {exc}"
    finally:
        if own:
            await session.close()
    if status >= 500:
        return Health.NOT_SERVING, f"{url}: HTTP {status}"
    return Health.SERVING, ""


def _probe_session() -> aiohttp.ClientSession:
    # Partners are on the topology's addresses: never through a proxy from the environment.
    return aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=None))


async def check_grpc(
    channel: aio.Channel, service: str, *, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[Health, str]:
    """grpc.health.v1 Check of ``service`` over ``channel``."""
    check = wrap_errors(health_pb2_grpc.HealthStub(channel).Check, target=service)
    try:
        reply = await check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except NotFoundError:
        return Health.NOT_SERVING, f"{service} is not registered"
    except CallError as exc:
        return Health.UNREACHABLE, f"{exc.code().name}: {exc.details() or ''}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return Health.SERVING, ""
    return Health.NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def overall_status(
    dependencies: Sequence[mesh_pb2.Dependency],
) -> tuple[mesh_pb2.ServiceStatus.ValueType, str]:
    """The report's overall status and why it is not SERVING.

    NOT_SERVING when the own database does not answer (the service is not ready); DEGRADED
    when a service or partner does not serve, or this caller's breaker for it is not closed.
    """
    down = [
        f"{d.name}: {_health_name(d.health)}"
        for d in dependencies
        if d.kind == mesh_pb2.DEPENDENCY_KIND_DATABASE
        and d.health != mesh_pb2.DEPENDENCY_HEALTH_SERVING
    ]
    if down:
        return mesh_pb2.SERVICE_STATUS_NOT_SERVING, "; ".join(down)
    degraded = []
    for d in dependencies:
        if d.kind == mesh_pb2.DEPENDENCY_KIND_DATABASE:
            continue
        why = [] if d.health == mesh_pb2.DEPENDENCY_HEALTH_SERVING else [_health_name(d.health)]
        if d.breaker_state in _BREAKER_NAMES:
            why.append(f"breaker {_BREAKER_NAMES[d.breaker_state]}")
        if why:
            degraded.append(f"{d.name}: {', '.join(why)}")
    if degraded:
        return mesh_pb2.SERVICE_STATUS_DEGRADED, "; ".join(degraded)
    return mesh_pb2.SERVICE_STATUS_SERVING, ""


def _health_name(value: int) -> str:
    try:
        return Health(value).name
    except ValueError:
        return "UNCHECKED"


def healthz_max_lag_s(environ: Mapping[str, str]) -> float:
    """``PAYMESH_HEALTHZ_MAX_LAG_S``, or the default.

    Raises:
        ValueError: it is set but not a positive number.
    """
    text = environ.get(HEALTHZ_MAX_LAG_VAR, "").strip()
    if not text:
        return HEALTHZ_MAX_LAG_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{HEALTHZ_MAX_LAG_VAR}={text!r} is not a positive number of seconds")
    return value


async def loop_lag_s(clock: Callable[[], float] | None = None) -> float:
    """How long the running event loop takes to come back to a task that yields now."""
    clock = clock or asyncio.get_running_loop().time
    started = clock()
    await asyncio.sleep(0)
    return clock() - started


async def process_health(
    service: str,
    *,
    database: sql.Target | None,
    max_lag_s: float = HEALTHZ_MAX_LAG_S,
    timeout_s: float = PROBE_TIMEOUT_S,
    clock: Callable[[], float] | None = None,
) -> tuple[int, dict[str, Any]]:
    """``/healthz``: HTTP status and JSON body; 503 naming each check that failed.

    Answered from the service's event loop, so an answer at all says it runs; the checks say
    how late it is (``event_loop``, against ``max_lag_s``) and whether the store answers a
    ``SELECT 1`` within ``timeout_s`` (``database``, for a service that has one).
    """
    lag = await loop_lag_s(clock)
    checks: dict[str, dict[str, Any]] = {
        "event_loop": {
            "ok": lag <= max_lag_s,
            "lag_ms": round(lag * 1000, 3),
            "max_lag_ms": round(max_lag_s * 1000, 3),
        }
    }
    if database is not None:
        health, error = await check_database(database, timeout_s=timeout_s)
        checks[DATABASE] = {
            "ok": health is Health.SERVING,
            "health": health.name,
            "target": sql.describe(database),
            "error": error,
        }
    failed = [name for name, check in checks.items() if not check["ok"]]
    body = {
        "service": service,
        "status": "failing" if failed else "ok",
        "failed": failed,
        "checks": checks,
    }
    return (503 if failed else 200), body


def _timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch_s * 1e9))
    return stamp


class DiagnosticsServicer(mesh_pb2_grpc.DiagnosticsServiceServicer):
    """GetDiagnostics: every downstream, partner and the own database, checked concurrently."""

    def __init__(
        self,
        *,
        spec: ServiceSpec,
        topology: Topology,
        breaker_states: Callable[[], Mapping[str, str]],
        recent: RecentCalls,
        database: sql.Target | None,
        open_channel: Callable[[str, str], aio.Channel],
        shared: SharedState | None = None,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._spec = spec
        self._topology = topology
        self._breaker_states = breaker_states
        self._recent = recent
        self._database = database
        self._shared = shared
        self._open_channel = open_channel
        self._timeout_s = probe_timeout_s
        self._wall_clock = wall_clock
        # Health checks get channels of their own: the service's mTLS identity, no chain.
        self._channels: dict[str, aio.Channel] = {}
        self._http: aiohttp.ClientSession | None = None  # partner checks, made on first use

    async def GetDiagnostics(
        self, request: mesh_pb2.GetDiagnosticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.GetDiagnosticsResponse:
        """One entry per dependency, in topology order: services, partners, database, redis."""
        entries = [self._service(name) for name in self._spec.calls]
        entries += [self._partner(name) for name in self._spec.partners]
        if self._database is not None:
            entries.append(self._own_database(self._database))
        if self._shared is not None:
            entries.append(self._redis(self._shared))
        dependencies = await asyncio.gather(*entries)
        status, reason = overall_status(dependencies)
        return mesh_pb2.GetDiagnosticsResponse(
            service_name=self._spec.name,
            dependencies=dependencies,
            report_time=_timestamp(self._wall_clock()),
            status=status,
            status_reason=reason,
        )

    async def close(self) -> None:
        """Close the health-check channels and the partner checks' session."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def _channel(self, target: str) -> aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            address = self._topology.dial(target).target
            channel = self._channels[target] = self._open_channel(target, address)
        return channel

    async def _service(self, name: str) -> mesh_pb2.Dependency:
        downstream = self._topology.service(name)
        health, error = await check_grpc(
            self._channel(name), downstream.proto_services[0], timeout_s=self._timeout_s
        )
        return self._entry(
            name, mesh_pb2.DEPENDENCY_KIND_GRPC_SERVICE, self._topology.address(name), health, error
        )

    async def _partner(self, name: str) -> mesh_pb2.Dependency:
        url = self._topology.partner_url(name)
        if self._http is None or self._http.closed:
            self._http = _probe_session()
        health, error = await check_partner(url, timeout_s=self._timeout_s, session=self._http)
        return self._entry(name, mesh_pb2.DEPENDENCY_KIND_HTTP_PARTNER, url, health, error)

    async def _own_database(self, path: sql.Target) -> mesh_pb2.Dependency:
        health, error = await check_database(path, timeout_s=self._timeout_s)
        return self._own(
            DATABASE, mesh_pb2.DEPENDENCY_KIND_DATABASE, sql.describe(path), health, error
        )

    async def _redis(self, shared: SharedState) -> mesh_pb2.Dependency:
        # Caches and limits fall back when Redis fails: DEGRADED in the report, never unready.
        health, error = await check_redis(shared)
        return self._own(REDIS, mesh_pb2.DEPENDENCY_KIND_CACHE, shared.target, health, error)

    def _own(
        self,
        name: str,
        kind: mesh_pb2.DependencyKind.ValueType,
        target: str,
        health: Health,
        error: str,
    ) -> mesh_pb2.Dependency:
        """The entry of a store of the service's own (no breaker, no recent calls)."""
        entry = mesh_pb2.Dependency(
            name=name,
            kind=kind,
            target=target,
            health=health.value,
            breaker_state=mesh_pb2.BREAKER_STATE_UNSPECIFIED,
            last_error=error,
        )
        if error:
            entry.last_error_time.CopyFrom(_timestamp(self._wall_clock()))
        return entry

    def _entry(
        self,
        name: str,
        kind: mesh_pb2.DependencyKind.ValueType,
        target: str,
        health: Health,
        check_error: str,
    ) -> mesh_pb2.Dependency:
        figures = self._recent.figures(name)
        state = self._breaker_states().get(name, CLOSED)
        entry = mesh_pb2.Dependency(
            name=name,
            kind=kind,
            target=target,
            health=health.value,
            breaker_state=_BREAKER_STATES.get(state, mesh_pb2.BREAKER_STATE_UNSPECIFIED),
            recent_call_count=figures.calls,
            error_rate_bps=round(figures.error_rate * 10_000),
            p99_latency_ms=round(figures.p99_s * 1000),
            p50_latency_ms=round(figures.p50_s * 1000),
            recent_retry_count=figures.retries,
            recent_window=duration_pb2.Duration(
                seconds=int(figures.window_s), nanos=int(figures.window_s % 1 * 1e9)
            ),
            last_error=figures.last_error,
            last_error_code=figures.last_error_code,
        )
        if figures.last_error_at is not None:
            entry.last_error_time.CopyFrom(_timestamp(figures.last_error_at))
        elif check_error:
            # Never called yet, but the check failed: that is the freshest error there is.
            entry.last_error = check_error
            entry.last_error_time.CopyFrom(_timestamp(self._wall_clock()))
        return entry


class ReadinessMonitor:
    """Sets the service's own health entries from its database; ``""`` (liveness) is left alone.

    A dependency being down never fails the service's liveness: restarting a process because
    something it calls is down is how restarts cascade through a mesh. With ``REDIS_URL``, the
    health entry ``redis`` follows Redis; the service stays ready without it (its caches read
    their sources and its limits count locally), so replicas are not all ejected at once.
    """

    def __init__(
        self,
        *,
        health: Any,
        services: Sequence[str],
        database: sql.Target | None,
        interval_s: float = READINESS_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
        shared: SharedState | None = None,
    ) -> None:
        self._health = health
        self._services = tuple(services)
        self._database = database
        self._shared = shared
        self._redis_ok: bool | None = None
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._ready: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Check the database (and Redis) once and set the entries; whether the service is ready."""
        if self._shared is not None:
            await self._check_redis(self._shared)
        if self._database is None:
            return True
        health, error = await check_database(self._database, timeout_s=self._timeout_s)
        ready = health is Health.SERVING
        if ready != self._ready:
            if not ready:
                log.warning("not ready: database %s: %s", self._database, error)
            elif self._ready is not None:
                log.info("ready again: database %s answers", self._database)
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in self._services:
                await self._health.set(service, status)
            self._ready = ready
        return ready

    async def _check_redis(self, shared: SharedState) -> None:
        health, error = await check_redis(shared)
        ok = health is Health.SERVING
        if ok != self._redis_ok:
            if not ok:
                log.warning("redis %s: %s (caches read their sources)", shared.target, error)
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set(REDIS, status)
            self._redis_ok = ok

    async def start(self) -> None:
        """Check once now, then every ``interval_s`` until :meth:`stop`."""
        await self.check()
        if self._database is not None or self._shared is not None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop checking (before health enters graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()
