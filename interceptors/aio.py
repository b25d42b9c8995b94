"""The grpc.aio adapter: makes one attempt on the channel and classifies it; the loop does the rest.

:class:`UnaryPolicy` runs a unary call's CLIENT span (opentelemetry-instrumentation-grpc), when
anything records it, around the core's attempt loop (``attempts.run_call``). The client
factory's channels (:class:`PolicyChannel`) run it in the stub's multicallable, in the
caller's task; :class:`PolicyInterceptor` runs it as a grpc.aio interceptor on a channel one
makes oneself (grpc.aio then adds a task per call). This module only sends an attempt (its
timeout, ``traceparent``, previous-attempts count); ``grpc_outcome`` says what its status means
(code, pushback, RetryInfo, TLS failure). The stream interceptor is a separate object (grpc.aio
applies an object implementing several call kinds to unary-unary only, grpc issue 31442):
streams get the call span and the deadline only, since a stream cannot be replayed safely
once messages flowed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc import _common, aio
from grpc._cython import cygrpc
from grpc.aio import _channel as _aio_channel
from opentelemetry import trace

from interceptors.attempts import Attempt, Call, run_call, stream_timeout
from interceptors.deadline import DeadlineExhausted
from interceptors.grpc_outcome import PREVIOUS_ATTEMPTS_KEY, GrpcOutcomes
from interceptors.retry import AttemptFailure
from interceptors.runtime import ChainRuntime
from interceptors.safety import (
    carries_request_id,
    method_is_idempotent,
    method_name,
    request_is_safe,
)
from interceptors.tracing import (
    TraceFields,
    client_interceptors,
    fail_span,
    propagation_fields,
    recorded_under,
    skips_unsampled,
)

Continuation = Callable[[aio.ClientCallDetails, Any], Awaitable[Any]]


def replace_details(details: aio.ClientCallDetails, **changes: Any) -> aio.ClientCallDetails:
    """A copy of aio call details with some fields changed."""
    fields: dict[str, Any] = {
        "method": details.method,
        "timeout": details.timeout,
        "metadata": details.metadata,
        "credentials": details.credentials,
        "wait_for_ready": details.wait_for_ready,
    }
    fields.update(changes)
    return aio.ClientCallDetails(**fields)


_TRACE_FIELDS = TraceFields()
#: How long a retry after UNAVAILABLE waits for the target's channel to (re)connect. It covers
#: grpcio's reconnect backoff (capped at this in chain.RECONNECT_OPTIONS) without letting a
#: target that is really down hold the call for its whole deadline.
RECONNECT_WAIT_S = 1.0
#: Call descriptions kept per target (method, safety, explicit timeout); callers that pass
#: ever-changing timeouts get a fresh one per call beyond this.
MAX_CALLS_KEPT = 1024


async def wait_connected(channel: aio.Channel, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``channel`` to be READY, asking it to connect."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        left = deadline - loop.time()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


class _UnaryAttempts(GrpcOutcomes):
    """One unary call's attempts on a grpc.aio channel (the loop's transport): each attempt's
    metadata (the caller's, ``traceparent``, previous-attempts count) and reconnect waits."""

    __slots__ = ("_base", "_request", "_wait_for_ready", "_waited_for_connection")

    def __init__(
        self,
        runtime: ChainRuntime,
        target: str,
        method: str,
        request: Any,
        base: Sequence[tuple[str, str | bytes]],
        wait_for_ready: bool | None,
    ) -> None:
        super().__init__(runtime, target, method)
        self._request = request
        self._base = base
        self._wait_for_ready = wait_for_ready
        self._waited_for_connection = False

    def _metadata(self, attempt: Attempt) -> aio.Metadata:
        context = attempt.trace_context
        fields = () if context is None else _TRACE_FIELDS.fields(context)
        if self._base:
            metadata = aio.Metadata(*self._base)
            if attempt.number > 1:
                metadata.add(PREVIOUS_ATTEMPTS_KEY, str(attempt.number - 1))
            for key, value in fields:
                metadata[key] = value
            return metadata
        # No keys of the caller's: the pairs as they come, in the same order.
        if attempt.number > 1:
            return aio.Metadata((PREVIOUS_ATTEMPTS_KEY, str(attempt.number - 1)), *fields)
        return aio.Metadata(*fields)

    def _wait(self, attempt: Attempt) -> bool | None:
        # Unset and the policy's false is gRPC's own default (fail fast): left unset, as
        # an explicit flag costs the call ~20 us of client CPU (measured for issue 11).
        wait = self._wait_for_ready
        return (attempt.policy.wait_for_ready or None) if wait is None else wait

    async def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        if failure.code != "UNAVAILABLE" or self._waited_for_connection:
            return
        # A reconnecting channel fails calls at once; wait once, briefly, for it to connect
        # instead of burning the retries out in grpcio's reconnect backoff.
        self._waited_for_connection = True
        waiter = self.runtime.connection_waiters.get(self.target)
        if waiter is None:
            self._wait_for_ready = True  # a channel we did not make: bounded by the deadline
        else:
            await waiter(max(0.0, min(RECONNECT_WAIT_S, left_s)))


class AioAttempts(_UnaryAttempts):
    """Attempts through a grpc.aio interceptor's continuation; the result is the call."""

    __slots__ = ("_continuation", "_details")

    def __init__(
        self,
        runtime: ChainRuntime,
        target: str,
        continuation: Continuation,
        details: aio.ClientCallDetails,
        request: Any,
        dropped_keys: frozenset[str],
    ) -> None:
        base = [(k, v) for k, v in (details.metadata or ()) if k not in dropped_keys]
        super().__init__(
            runtime, target, method_name(details.method), request, base, details.wait_for_ready
        )
        self._continuation = continuation
        self._details = details

    async def attempt(self, attempt: Attempt) -> Any:
        given = self._details
        details = aio.ClientCallDetails(
            given.method,
            attempt.timeout_s,
            self._metadata(attempt),
            given.credentials,
            self._wait(attempt),
        )
        call = await self._continuation(details, self._request)
        attempt.attach(call)
        await call
        return call


class StubAttempts(_UnaryAttempts):
    """Attempts straight on a stub's plain multicallable (no call details, no interceptor);
    the result is the response."""

    __slots__ = ("_credentials", "_plain")

    def __init__(
        self,
        runtime: ChainRuntime,
        target: str,
        method: str,
        plain: aio.UnaryUnaryMultiCallable[Any, Any],
        request: Any,
        base: Sequence[tuple[str, str | bytes]],
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
    ) -> None:
        # _UnaryAttempts' fields set here, without its two __init__ frames: one per call.
        self.runtime, self.target, self.method = runtime, target, method
        self._request, self._base, self._wait_for_ready = request, base, wait_for_ready
        self._waited_for_connection = False
        self._plain = plain
        self._credentials = credentials

    def attempt(self, attempt: Attempt) -> Any:
        # The call object itself is what the loop awaits: no coroutine of our own around it.
        call = self._plain(
            self._request,
            timeout=attempt.timeout_s,
            metadata=self._metadata(attempt),
            credentials=self._credentials,
            wait_for_ready=self._wait(attempt),
        )
        attempt.attach(call)
        return call


#: What a call cancelled by its caller reports (grpc.aio's own words).
_LOCALLY_CANCELLED = "Locally cancelled by application!"
#: What an attempt the opening breaker failed reports.
_BREAKER_CANCELLED = "cancelled: the circuit breaker opened while the call was in flight"


class CoreMethod:
    """One method's plain multicallable, taken apart once for :class:`CoreAttempts`: the
    channel's core object, the method's path and registered handle, its serializers.

    :func:`core_method` makes one only for grpc.aio's own uninterceptored multicallable
    of the pinned grpcio (``pyproject.toml``); anything else keeps the public path."""

    __slots__ = ("channel", "deserialize", "handle", "path", "serialize")

    def __init__(
        self,
        channel: Any,
        path: bytes,
        handle: int,
        serialize: Callable[[Any], bytes] | None,
        deserialize: Callable[[bytes], Any] | None,
    ) -> None:
        self.channel, self.path, self.handle = channel, path, handle
        self.serialize, self.deserialize = serialize, deserialize


def core_method(plain: object) -> CoreMethod | None:
    """``plain``'s core pieces, or None when it is not grpc.aio's plain multicallable (an
    intercepted one, a test double, another grpcio's layout): such calls keep the stub path."""
    if type(plain) is not _aio_channel.UnaryUnaryMultiCallable:
        return None
    fields = vars(plain) if hasattr(plain, "__dict__") else {}
    channel = fields.get("_channel")
    path = fields.get("_method")
    handle = fields.get("_registered_call_handle", 0)
    if (
        fields.get("_interceptors")
        or not isinstance(channel, cygrpc.AioChannel)
        or not isinstance(path, bytes)
        or not isinstance(handle, int)
    ):
        return None
    return CoreMethod(
        channel,
        path,
        handle,
        fields.get("_request_serializer"),
        fields.get("_response_deserializer"),
    )


class CoreAttempts(StubAttempts):
    """:class:`StubAttempts` straight on the channel's core call, as grpc.aio's own
    unary call makes it, without the task and call object grpc.aio puts around each call
    (measured for issue 11: 0.94x a bare stub's latency, 31 us less CPU per call).

    The same core batch, deadline, metadata, credentials and wait-for-ready; a failed call
    raises the same ``AioRpcError`` grpc.aio would. It differs in one thing only: the
    channel's ``close()`` does not cancel such a call in flight, which then ends on its
    own answer or deadline (every chain call has one)."""

    __slots__ = ("_core", "_in_flight")

    def __init__(
        self,
        runtime: ChainRuntime,
        target: str,
        method: str,
        core: CoreMethod,
        request: Any,
        base: Sequence[tuple[str, str | bytes]],
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
    ) -> None:
        self.runtime, self.target, self.method = runtime, target, method
        self._request, self._base, self._wait_for_ready = request, base, wait_for_ready
        self._waited_for_connection = False
        self._credentials = credentials
        self._core = core
        self._in_flight: Any = None

    def _pairs(self, attempt: Attempt) -> tuple[tuple[str, str | bytes], ...]:
        context = attempt.trace_context
        fields = () if context is None else _TRACE_FIELDS.fields(context)
        if attempt.number > 1:
            fields = ((PREVIOUS_ATTEMPTS_KEY, str(attempt.number - 1)), *fields)
        base = self._base
        return (*base, *fields) if base else fields

    def cancel(self) -> bool:
        """Fail the attempt in flight (the opening breaker's abort)."""
        call = self._in_flight
        if call is None or call.done():
            return False
        call.cancel(_BREAKER_CANCELLED)
        return True

    async def attempt(self, attempt: Attempt) -> Any:
        core = self._core
        request = self._request
        serialized = request if core.serialize is None else core.serialize(request)
        call = self._in_flight = core.channel.call(
            core.path,
            time.time() + attempt.timeout_s,
            self._credentials,
            self._wait(attempt),
            core.handle,
        )
        attempt.attach(self)
        try:
            raw = await call.unary_unary(serialized, self._pairs(attempt), None)
        except asyncio.CancelledError:
            if not call.done():
                call.cancel(_LOCALLY_CANCELLED)
            raise
        if call.is_ok():
            return raw if core.deserialize is None else core.deserialize(raw)
        status = await call.status()
        raise aio.AioRpcError(
            _common.CYGRPC_STATUS_CODE_TO_STATUS_CODE[status.code()],
            aio.Metadata.from_tuple(await call.initial_metadata()),
            aio.Metadata.from_tuple(status.trailing_metadata()),
            details=status.details(),
            debug_error_string=status.debug_error_string(),
        )


class UnaryPolicy:
    """The chain of one target's unary calls: its CLIENT span, when recorded, around the loop."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target
        self._traced = (
            client_interceptors(runtime.tracer_provider)[0] if runtime.trace_calls else None
        )
        #: Under a parent-based sampler nothing below an unsampled parent is recorded: such a
        #: call gets no span object at all, only the parent's ``traceparent``, unchanged.
        self._skips_unsampled = skips_unsampled(runtime.tracer)
        #: Dropped from the call's metadata: each attempt sends its own.
        self._dropped = propagation_fields() | {PREVIOUS_ATTEMPTS_KEY}
        self._calls: dict[tuple[str, bool, float | None], Call] = {}

    async def run(
        self, continuation: Continuation, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        """Make the call through the attempt loop; the last attempt's (finished) call object."""
        traced = self._traced
        if traced is None:
            return await self._attempts(continuation, details, request)
        parent = trace.get_current_span()
        if self._skips_unsampled and not recorded_under(parent):
            return await self._attempts(continuation, details, request)
        opened: list[trace.Span] = []
        looped = functools.partial(self._in_call_span, continuation, parent, opened)
        try:
            return await traced.intercept_unary_unary(looped, details, request)
        except BaseException as exc:
            # The instrumentation ends its span when the call object completes, but this chain
            # raises failures instead of returning a failed call: end the span here, after it
            # recorded the error (it records an RpcError only).
            for span in opened:
                if not isinstance(exc, grpc.RpcError):
                    fail_span(span, type(exc).__name__, str(exc), None)
                span.end()
            raise

    async def _in_call_span(
        self,
        continuation: Continuation,
        parent: trace.Span,
        opened: list[trace.Span],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        span = trace.get_current_span()
        if span is not parent:  # the instrumentation made one (it skips filtered calls)
            opened.append(span)
        return await self._attempts(continuation, client_call_details, request)

    def untraced(self) -> bool:
        """Whether a call made now gets no span: nothing records calls, or the current span
        is an unsampled parent under the parent-based sampler."""
        return self._traced is None or (
            self._skips_unsampled and not recorded_under(trace.get_current_span())
        )

    def call(self, method: str, safe: bool, timeout_s: float | None) -> Call:
        """The description of a call (one per method, safety and explicit timeout)."""
        key = (method, safe, timeout_s)
        call = self._calls.get(key)
        if call is None:  # the same every time
            call = Call(
                target=self.target,
                method=method,
                safe=safe,
                timeout_s=timeout_s,
                attempt_name=method.lstrip("/") + " attempt",
            )
            if len(self._calls) < MAX_CALLS_KEPT:
                self._calls[key] = call
        return call

    def without_propagation(
        self, metadata: aio.Metadata | None
    ) -> Sequence[tuple[str, str | bytes]]:
        """The caller's metadata without the keys each attempt sends itself."""
        if not metadata:
            return ()
        dropped = self._dropped
        return [(k, v) for k, v in metadata if k not in dropped]

    async def _attempts(
        self, continuation: Continuation, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        transport = AioAttempts(
            self.runtime, self.target, continuation, details, request, self._dropped
        )
        method = transport.method
        call = self.call(method, request_is_safe(method, request), details.timeout)
        return await run_call(transport, call, self.runtime)


class PolicyInterceptor(aio.UnaryUnaryClientInterceptor):
    """The chain as a grpc.aio interceptor, for a channel one makes oneself (the client
    factory's channels use :class:`PolicyChannel`, which spares grpc.aio's interceptor task)."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target
        self._policy = UnaryPolicy(runtime, target)

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._policy.run(continuation, client_call_details, request)


class PolicyMultiCallable:
    """A unary-unary multicallable running the chain in the caller's own task.

    grpc.aio's interceptor machinery runs every intercepted call in a task of its own (two
    more event-loop turns per call); here the loop awaits the plain call directly. A call
    that gets no span (the common case: see ``UnaryPolicy.untraced``) goes straight to the
    attempt loop with this method's description, resolved once; a recorded one runs inside
    the instrumentation's CLIENT span. Calling it returns a coroutine of the response;
    failures raise ``CallError`` as the chain words them.
    """

    __slots__ = ("_core", "_idempotent", "_method", "_plain", "_policy", "_send")

    def __init__(
        self, policy: UnaryPolicy, method: str, plain: aio.UnaryUnaryMultiCallable[Any, Any]
    ) -> None:
        self._policy = policy
        self._method = method
        self._plain = plain
        self._core = core_method(plain)
        self._idempotent = method_is_idempotent(method)

        async def send(details: aio.ClientCallDetails, request: Any) -> Any:
            return plain(
                request,
                timeout=details.timeout,
                metadata=details.metadata,
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            )

        self._send = send

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: aio.Metadata | Sequence[tuple[str, str | bytes]] | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Coroutine[Any, Any, Any]:
        if compression is not None:
            raise ValueError("per-call compression is not supported through the policy chain")
        if metadata is not None and not isinstance(metadata, aio.Metadata):
            metadata = aio.Metadata(*metadata)
        policy, method = self._policy, self._method
        if not policy.untraced():
            return self._traced(request, timeout, metadata, credentials, wait_for_ready)
        # No span: the attempt loop's coroutine is the call's, with nothing wrapped around it.
        safe = self._idempotent or carries_request_id(request)
        core = self._core
        transport = (
            StubAttempts(
                policy.runtime,
                policy.target,
                method,
                self._plain,
                request,
                policy.without_propagation(metadata),
                credentials,
                wait_for_ready,
            )
            if core is None
            else CoreAttempts(
                policy.runtime,
                policy.target,
                method,
                core,
                request,
                policy.without_propagation(metadata),
                credentials,
                wait_for_ready,
            )
        )
        return run_call(transport, policy.call(method, safe, timeout), policy.runtime)

    async def _traced(
        self,
        request: Any,
        timeout_s: float | None,
        metadata: aio.Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
    ) -> Any:
        details = aio.ClientCallDetails(
            self._method, timeout_s, metadata, credentials, wait_for_ready
        )
        call = await self._policy.run(self._send, details, request)
        return await call


class ForwardingChannel(aio.Channel):
    """An aio channel that hands everything to the channel :attr:`current` returns."""

    @property
    def current(self) -> aio.Channel:
        """The channel calls go to now."""
        raise NotImplementedError

    async def __aenter__(self) -> ForwardingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self.current.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current.channel_ready()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.current.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.current.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.current.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.current.stream_stream(method, *args, **kwargs)


class PolicyChannel(ForwardingChannel):
    """One target's channel with the chain on it: unary-unary calls through
    :class:`PolicyMultiCallable`, server streams through the plain channel's
    :class:`StreamDeadlineInterceptor`."""

    def __init__(self, plain: aio.Channel, policy: UnaryPolicy) -> None:
        self._plain = plain
        self._policy = policy

    @property
    def current(self) -> aio.Channel:
        return self._plain

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        plain = self._plain.unary_unary(method, *args, **kwargs)
        return PolicyMultiCallable(self._policy, method_name(method), plain)


def stream_details(
    runtime: ChainRuntime, target: str, details: aio.ClientCallDetails
) -> aio.ClientCallDetails:
    """A stream's details with the one overall deadline (no retry: see the module)."""
    method = method_name(details.method)
    try:
        timeout = stream_timeout(runtime, target, method, details.timeout)
    except DeadlineExhausted as exc:
        raise GrpcOutcomes(runtime, target, method).deadline_exhausted(str(exc)) from None
    wait = details.wait_for_ready
    if wait is None:
        wait = runtime.policy(target, method).wait_for_ready
    return replace_details(details, timeout=timeout, wait_for_ready=wait)


class StreamDeadlineInterceptor(aio.UnaryStreamClientInterceptor):
    """The span and deadline of server-streaming calls (one object per call kind)."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target
        _, self._traced = client_interceptors(runtime.tracer_provider)

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._traced.intercept_unary_stream(
            functools.partial(self._with_deadline, continuation), client_call_details, request
        )

    async def _with_deadline(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        details = stream_details(self.runtime, self.target, client_call_details)
        return await continuation(details, request)


def aio_chain(runtime: ChainRuntime, target: str) -> list[aio.ClientInterceptor]:
    """The interceptors of one target's channel: the unary one, then the stream one."""
    return [PolicyInterceptor(runtime, target), StreamDeadlineInterceptor(runtime, target)]


def policy_channel(runtime: ChainRuntime, target: str, plain: aio.Channel) -> PolicyChannel:
    """``plain`` (made with :class:`StreamDeadlineInterceptor` only) with the chain on it."""
    return PolicyChannel(plain, UnaryPolicy(runtime, target))
