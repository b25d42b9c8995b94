"""Shared harness of the chain's integration tests: a test service that fails on command.

``ScriptedServicer`` serves ``paymesh.testing.v1.TestService`` on a real grpc.aio server on
127.0.0.1; each method fails as scripted (codes, holds, pushback, RetryInfo) and every attempt
is recorded with its metadata and remaining deadline. ``Relay`` calls a next hop, for
propagation and cancellation across A -> B -> C.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.trace import TracerProvider

from interceptors.chain import ClientChain, build_client_chain
from interceptors.errors import PUSHBACK_KEY, STATUS_DETAILS_KEY, Reason, rich_status
from interceptors.policy import PolicyConfig
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc
from services.mesh.server import ServerPolicyInterceptor


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """What one attempt gets instead of (or before) its answer."""

    code: grpc.StatusCode | None = None
    """Status to fail with; None answers normally (after ``hold_s``)."""
    hold_s: float = 0.0
    """Seconds the server takes before answering or failing."""
    pushback_ms: int | None = None
    """``grpc-retry-pushback-ms`` to send with the failure."""
    retry_delay_s: float | None = None
    """google.rpc.RetryInfo delay to send with the failure."""


@dataclass(slots=True)
class Attempt:
    """One attempt the server saw."""

    method: str
    metadata: dict[str, str]
    time_remaining: float | None
    at: float


@dataclass
class ScriptedServicer(testing_pb2_grpc.TestServiceServicer):
    """Fails each method as scripted; otherwise answers; records every attempt."""

    name: str = "test-service"
    script: dict[str, deque[Fault]] = field(default_factory=dict)
    default: Fault = field(default_factory=Fault)
    next_hop: Any = None
    attempts: list[Attempt] = field(default_factory=list)
    active: int = 0
    peak_active: int = 0
    gather_until: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    gathered: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, method: str, *faults: Fault) -> None:
        """Queue faults for the next attempts of ``method`` (``Read``, ``Write``, ...)."""
        self.script.setdefault(method, deque()).extend(faults)

    def count(self, method: str | None = None) -> int:
        """Attempts seen, of one method or of all."""
        return sum(1 for a in self.attempts if method is None or a.method == method)

    async def _serve(self, method: str, context: aio.ServicerContext[Any, Any]) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.attempts.append(Attempt(method, metadata, context.time_remaining(), time.monotonic()))
        queue = self.script.get(method)
        fault = queue.popleft() if queue else self.default
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self.arrived.set()
        try:
            if self.gather_until:
                if self.peak_active >= self.gather_until:
                    self.gathered.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gathered.wait(), timeout=5.0)
            if fault.hold_s:
                await asyncio.sleep(fault.hold_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.active -= 1
        if fault.code is not None:
            trailing: list[tuple[str, str | bytes]] = []
            if fault.pushback_ms is not None:
                trailing.append((PUSHBACK_KEY, str(fault.pushback_ms)))
            status = rich_status(
                fault.code,
                f"scripted {fault.code.name}",
                domain=self.name,
                reason=Reason.FAULT_INJECTED,
                retry_delay_s=fault.retry_delay_s,
            )
            trailing.append((STATUS_DETAILS_KEY, status.SerializeToString()))
            context.set_trailing_metadata(tuple(trailing))
            await context.abort(fault.code, f"scripted {fault.code.name}")

    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        await self._serve("Read", context)
        return testing_pb2.ReadResponse(text=request.text, attempt=self.count("Read"))

    async def Write(self, request: Any, context: Any) -> testing_pb2.WriteResponse:
        await self._serve("Write", context)
        return testing_pb2.WriteResponse(text=request.text)

    async def WriteUnsafe(self, request: Any, context: Any) -> testing_pb2.WriteUnsafeResponse:
        await self._serve("WriteUnsafe", context)
        return testing_pb2.WriteUnsafeResponse(text=request.text)

    async def Relay(self, request: Any, context: Any) -> testing_pb2.RelayResponse:
        if self.next_hop is not None:
            self.attempts.append(Attempt("Relay", {}, context.time_remaining(), time.monotonic()))
            self.arrived.set()
            try:
                response: testing_pb2.RelayResponse = await self.next_hop.Relay(request)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return response
        await self._serve("Relay", context)
        try:
            await asyncio.sleep(request.hold_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        left = context.time_remaining()
        return testing_pb2.RelayResponse(
            text=request.text, deadline_left_s=-1.0 if left is None else left
        )


@dataclass
class RunningServer:
    """A test server and where it listens."""

    server: aio.Server
    port: int
    servicer: ScriptedServicer
    health: Any = None
    """Its ``grpc.health.v1`` servicer, when started with one (``set(TEST_SERVICE, ...)``)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


#: Full name of the test service (the name its health is reported under).
TEST_SERVICE = testing_pb2.DESCRIPTOR.services_by_name["TestService"].full_name


async def start_server(
    servicer: ScriptedServicer,
    port: int = 0,
    *,
    access_log_sample: float = 0.0,
    health: bool = False,
) -> RunningServer:
    """Serve ``servicer`` on 127.0.0.1 behind the server interceptor (``port`` 0: any free one),
    with ``health``: also grpc.health.v1, the test service SERVING."""
    server = aio.server(
        interceptors=[
            ServerPolicyInterceptor(domain=servicer.name, access_log_sample=access_log_sample)
        ],
        options=[("grpc.so_reuseport", 0)],
    )
    testing_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    health_servicer = None
    if health:
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set(TEST_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return RunningServer(server=server, port=bound, servicer=servicer, health=health_servicer)


class ShiftedClock:
    """The monotonic clock plus an offset a test can advance (breaker open periods)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


T = TypeVar("T")


def poll_until(
    what: str, check: Callable[[], T | None], *, timeout_s: float = 60.0, every_s: float = 0.1
) -> T:
    """``check()`` until it returns something truthy (returned); fail naming ``what`` after the
    deadline. For tests of real processes, which wait from the test's own thread."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)  # polling for a state, bounded by the deadline


async def eventually(predicate: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


TARGET = "test-service"


def make_chain(
    policy: dict[str, Any] | None = None,
    *,
    caller: str = "test-caller",
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = lambda: 0.0,
    tracer_provider: TracerProvider | None = None,
) -> ClientChain:
    """A chain whose ``[defaults]`` table is ``policy``; no jitter unless ``rng`` says so."""
    config = PolicyConfig.from_mapping({"defaults": policy or {}})
    return build_client_chain(
        caller=caller, config=config, clock=clock, rng=rng, tracer_provider=tracer_provider
    )


@contextlib.asynccontextmanager
async def serving(
    servicer: ScriptedServicer | None = None, *, access_log_sample: float = 0.0
) -> AsyncIterator[RunningServer]:
    """A running test server for the duration of the block."""
    running = await start_server(
        servicer or ScriptedServicer(), access_log_sample=access_log_sample
    )
    try:
        yield running
    finally:
        await running.server.stop(None)


@contextlib.asynccontextmanager
async def stub_for(
    chain: ClientChain, address: str, target: str = TARGET
) -> AsyncIterator[testing_pb2_grpc.TestServiceAsyncStub]:
    """A TestService stub on an aio channel made the way the client factory makes them."""
    channel = chain.aio_channel(target, address)
    try:
        yield testing_pb2_grpc.TestServiceStub(channel)
    finally:
        await channel.close()
