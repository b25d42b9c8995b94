"""The dependency report of every service (Diagnostics RPC) and the readiness of its database.

Each dependency is asked for its own health directly, with a short timeout and never through
the policy chain (a check must not trip, or be refused by, the breaker it reports on); the
breaker state and recent figures are this caller's. Liveness (health ``""``) stays the
process's own; the service's own health entries follow its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interceptors.breaker import CLOSED, HALF_OPEN, OPEN
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.recent import RecentCalls
from services.topology import ServiceSpec, Topology

log = logging.getLogger("paymesh.diagnostics")

DIAGNOSTICS_SERVICE = mesh_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name
#: How long one dependency's health check may take; a report never waits longer.
PROBE_TIMEOUT_S = 1.0
#: How often the own database is checked for readiness.
READINESS_INTERVAL_S = 5.0
DATABASE = "database"

_BREAKER_STATES = {
    CLOSED: mesh_pb2.BREAKER_STATE_CLOSED,
    HALF_OPEN: mesh_pb2.BREAKER_STATE_HALF_OPEN,
    OPEN: mesh_pb2.BREAKER_STATE_OPEN,
}


class Health(enum.IntEnum):
    """A dependency's answer to a health check (the proto's DependencyHealth values)."""

    SERVING = mesh_pb2.DEPENDENCY_HEALTH_SERVING
    NOT_SERVING = mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING
    UNREACHABLE = mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE


def _select_one(path: Path, timeout_s: float) -> None:
    # mode=rw: a missing file is a failure, not a new empty database.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout_s)
    try:
        # Reading the schema touches the file, so a corrupt one fails here too.
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    finally:
        conn.close()


async def check_database(path: Path, *, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[Health, str]:
    """``SELECT 1`` on the SQLite file at ``path``: its health and the error, if any."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_select_one, path, timeout_s), timeout_s)
    except TimeoutError:
        return Health.UNREACHABLE, f"no answer from {path} within {timeout_s:.1f}s"
    except sqlite3.Error as exc:
        return Health.NOT_SERVING, f"{type(exc).__name__}: {exc}"
    return Health.SERVING, ""


def _http_status(url: str, timeout_s: float) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def check_partner(base_url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[Health, str]:
    """``GET <base_url>/healthz``: any answer below 500 means the partner is up."""
    url = f"{base_url.rstrip('/')}/healthz"
    try:
        status = await asyncio.wait_for(asyncio.to_thread(_http_status, url, timeout_s), timeout_s)
    except TimeoutError:
        return Health.UNREACHABLE, f"no answer from {url} within {timeout_s:.1f}s"
    except (OSError, ValueError) as exc:
        return Health.UNREACHABLE, f"{url}: {exc}"
    if status >= 500:
        return Health.NOT_SERVING, f"{url}: HTTP {status}"
    return Health.SERVING, ""


async def check_grpc(
    channel: aio.Channel, service: str, *, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[Health, str]:
    """grpc.health.v1 Check of ``service`` over ``channel``."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return Health.NOT_SERVING, f"{service} is not registered"
        return Health.UNREACHABLE, f"{exc.code().name}: {exc.details() or ''}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return Health.SERVING, ""
    return Health.NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


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
        database: Path | None,
        open_channel: Callable[[str, str], aio.Channel],
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._spec = spec
        self._topology = topology
        self._breaker_states = breaker_states
        self._recent = recent
        self._database = database
        self._open_channel = open_channel
        self._timeout_s = probe_timeout_s
        self._wall_clock = wall_clock
        # Health checks get channels of their own: the service's mTLS identity, no chain.
        self._channels: dict[str, aio.Channel] = {}

    async def GetDiagnostics(
        self, request: mesh_pb2.GetDiagnosticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> mesh_pb2.GetDiagnosticsResponse:
        """One entry per dependency, in topology order: services, partners, database."""
        entries = [self._service(name) for name in self._spec.calls]
        entries += [self._partner(name) for name in self._spec.partners]
        if self._database is not None:
            entries.append(self._own_database(self._database))
        dependencies = await asyncio.gather(*entries)
        return mesh_pb2.GetDiagnosticsResponse(
            service_name=self._spec.name,
            dependencies=dependencies,
            report_time=_timestamp(self._wall_clock()),
        )

    async def close(self) -> None:
        """Close the health-check channels."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _channel(self, target: str) -> aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            address = self._topology.address(target)
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
        health, error = await check_partner(url, timeout_s=self._timeout_s)
        return self._entry(name, mesh_pb2.DEPENDENCY_KIND_HTTP_PARTNER, url, health, error)

    async def _own_database(self, path: Path) -> mesh_pb2.Dependency:
        health, error = await check_database(path, timeout_s=self._timeout_s)
        entry = mesh_pb2.Dependency(
            name=DATABASE,
            kind=mesh_pb2.DEPENDENCY_KIND_DATABASE,
            target=str(path),
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
    something it calls is down is how restarts cascade through a mesh.
    """

    def __init__(
        self,
        *,
        health: Any,
        services: Sequence[str],
        database: Path | None,
        interval_s: float = READINESS_INTERVAL_S,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._health = health
        self._services = tuple(services)
        self._database = database
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._ready: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Check the database once and set the entries; whether the service is ready."""
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

    async def start(self) -> None:
        """Check once now, then every ``interval_s`` until :meth:`stop`."""
        await self.check()
        if self._database is not None:
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
