"""Builds the client policy chain of one process, in its one documented order.

The call stack of every outgoing unary call, outermost first (gRPC or an HTTP partner)::

    stub.Method(request) / partner.request(...)
      the adapter's entry        aio.PolicyMultiCallable (the client factory's channels, no
                                 grpc.aio interceptor task) or aio.PolicyInterceptor (a channel
                                 made with aio_interceptors), both aio.UnaryPolicy: the call's
                                 CLIENT span (opentelemetry-instrumentation-grpc) unless nothing
                                 records it (no receiver, or an unsampled parent under the
                                 parent-based sampler: no span object, the parent's traceparent
                                 propagated unchanged); sync.SyncPolicyInterceptor (grpc-
                                 interceptor, no span); http.PartnerClient: its own CLIENT span
        attempts.run_call        the one loop (run_call_sync for the sync adapter):
          deadline               one overall deadline: min(policy, incoming left - margin)
          for each attempt:
            breaker              the target's breaker admits it; open fails fast (a
                                 ``circuit_open`` event on an attempt span), so does a target
                                 with ``max_concurrent_calls`` in flight; opening fails the
                                 attempts still in flight (aio and HTTP)
            the attempt          the adapter's one call (grpc channel, reconnect backoff tuned,
                                 round robin over healthy, not ejected replicas: balancing.py;
                                 aiohttp's keep-alive pool) in its own span (``paymesh.attempt``
                                 attribute) when the call is recorded, whose ``traceparent`` it
                                 carries
            classify             the adapter says what its outcome means (grpc_outcome, http)
            decide, sleep        retry.RetryRun: safe calls only, the policy's retryable codes,
                                 within the deadline and the target's budget
          observe.ChainObserver  every event above counted, logged and traced, once

``build_client_chain`` is called once per process; the client factory asks it for the
channel of each target (``aio_channel``: the chain's options, the chain on its stubs' unary
multicallables) and for partner HTTP clients.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio
from grpc_interceptor import ClientInterceptor
from opentelemetry import trace

from interceptors.aio import (
    RECONNECT_WAIT_S,
    StreamDeadlineInterceptor,
    aio_chain,
    policy_channel,
    wait_connected,
)
from interceptors.balancing import service_config_json
from interceptors.breaker import BreakerRegistry
from interceptors.http import PartnerClient
from interceptors.policy import PolicyConfig
from interceptors.runtime import AsyncSleep, ChainRuntime, Clock, Random, SyncSleep
from interceptors.sync import sync_chain
from interceptors.telemetry import ChainTelemetry

#: grpcio's reconnect backoff (1 s initial, up to 120 s) would keep a restarted target
#: unreachable long after it is back; retry it quickly and cap the wait at a second.
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_WAIT_S * 1000)),
    # The chain retries; grpcio's own service-config retries would multiply ours.
    ("grpc.enable_retries", 0),
)


class ClientChain:
    """The policy chain of one process: interceptors per target, partner clients, diagnostics."""

    def __init__(self, runtime: ChainRuntime) -> None:
        self.runtime = runtime

    @property
    def caller(self) -> str:
        """Mesh name of the service this chain makes calls for."""
        return self.runtime.caller

    def aio_interceptors(self, target: str) -> list[aio.ClientInterceptor]:
        """Interceptors of an aio channel to ``target`` (``insecure_channel(interceptors=...)``)."""
        return aio_chain(self.runtime, target)

    def aio_channel(
        self,
        target: str,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        extra_options: Sequence[tuple[str, Any]] = (),
        health_service: str = "",
    ) -> aio.Channel:
        """An aio channel to ``target`` at ``address`` with the chain on it.

        ``address`` is a gRPC target (one endpoint, ``ipv4:``/``ipv6:`` lists, ``dns:///``):
        calls go round robin over its replicas, as the target's balancing policy says, with
        each replica's ``health_service`` health deciding whether it gets calls. TLS with
        ``credentials`` (the mesh's mTLS identity), plaintext without. Retries after
        UNAVAILABLE wait (briefly) for this channel to reconnect.
        """
        options = self.aio_channel_options(
            target, extra_options=extra_options, health_service=health_service
        )
        # Unary calls run the chain in the stub's multicallables (aio.PolicyChannel), not in a
        # grpc.aio interceptor, which would add a task per call; streams keep theirs.
        streams = [StreamDeadlineInterceptor(self.runtime, target)]
        plain = (
            aio.secure_channel(address, credentials, options=options, interceptors=streams)
            if credentials is not None
            else aio.insecure_channel(address, options=options, interceptors=streams)
        )
        self.runtime.connection_waiters[target] = lambda timeout_s: wait_connected(plain, timeout_s)
        return policy_channel(self.runtime, target, plain)

    def aio_channel_options(
        self,
        target: str,
        *,
        extra_options: Sequence[tuple[str, Any]] = (),
        health_service: str = "",
    ) -> list[tuple[str, Any]]:
        """Every channel argument :meth:`aio_channel` makes the channel to ``target`` with."""
        return [
            *self.channel_options(),
            *self.balancing_options(target, health_service=health_service),
            *extra_options,
        ]

    def sync_interceptors(self, target: str) -> list[ClientInterceptor]:
        """Interceptors for ``grpc.intercept_channel(channel, *...)`` to ``target``."""
        return sync_chain(self.runtime, target)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments every channel of the chain is made with."""
        return list(RECONNECT_OPTIONS)

    def balancing_options(self, target: str, *, health_service: str = "") -> list[tuple[str, Any]]:
        """The service config of a channel to ``target``: round robin, health, ejection."""
        policy = self.runtime.config.target_policy(target).balancing
        return [("grpc.service_config", service_config_json(policy, health_service=health_service))]

    def http_client(self, partner: str, base_url: str) -> PartnerClient:
        """A client of the HTTP partner ``partner`` at ``base_url`` through the same core."""
        return PartnerClient(self.runtime, partner, base_url)

    @property
    def breakers(self) -> BreakerRegistry:
        """The breakers, one per target; ``breakers.states()`` maps target to state."""
        return self.runtime.breakers

    @property
    def telemetry(self) -> ChainTelemetry:
        """The chain's counters."""
        return self.runtime.telemetry

    def diagnostics(self) -> dict[str, Any]:
        """Breaker states, their figures and budget figures per target, for a status page.

        ``breakers`` maps target to state (``half-open-ready``: open, its open time passed);
        ``breaker_details`` adds the time left open, the calls in flight and why it last opened.
        """
        readouts = self.breakers.readouts()
        return {
            "breakers": {target: r.state for target, r in readouts.items()},
            "breaker_details": {target: r.as_dict() for target, r in readouts.items()},
            "budgets": self.runtime.budgets(),
        }


def build_client_chain(
    *,
    caller: str,
    config: PolicyConfig,
    clock: Clock = time.monotonic,
    sleep: AsyncSleep = asyncio.sleep,
    sync_sleep: SyncSleep = time.sleep,
    rng: Random = random.random,
    tracer_provider: trace.TracerProvider | None = None,
    trace_calls: bool | None = None,
) -> ClientChain:
    """The chain of the process serving ``caller``; build it once and share it.

    Spans go to ``tracer_provider`` (services.mesh.tracing makes one per service); None uses the
    global provider, a no-op unless the process set one. ``trace_calls=False`` skips the
    call and attempt spans (when nothing records them) but still propagates the trace id;
    unset, calls are traced exactly when a tracer provider is given.
    """
    runtime = ChainRuntime(
        caller=caller,
        config=config,
        clock=clock,
        sleep=sleep,
        sync_sleep=sync_sleep,
        rng=rng,
        tracer_provider=tracer_provider,
        trace_calls=tracer_provider is not None if trace_calls is None else trace_calls,
    )
    return ClientChain(runtime)
