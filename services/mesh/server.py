"""Server-side interceptor of every service: admission, deadline capture, error mapping, access log.

One object per concern would cost an extra await per call for nothing: they share the
call's timing, so one ``AsyncServerInterceptor`` does them in order. Admission first: a call
beyond the concurrency cap is refused at once (RESOURCE_EXHAUSTED, reason OVERLOADED) instead
of queueing to its deadline, a method's precheck may refuse it before any work (a dependency
known to be down), and the gate (the topology's authorization) decides whether the verified
caller may make it at all. A servicer raises domain
errors (``services.mesh.errors``); a downstream failure that escapes it becomes UNAVAILABLE
with pushback ``-1`` so that only the bottom layer of the mesh retries. The access log
writes every failed call; a successful one only at DEBUG or when sampled, since formatting
a line for every call cost more than the rest of this interceptor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import grpc
from google.rpc import status_pb2
from grpc import aio
from opentelemetry import context as otel_context

from interceptors.codes import DEPENDENCY_FAULT
from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import (
    PUSHBACK_KEY,
    STATUS_DETAILS_KEY,
    DeadlineExceededError,
    Reason,
    from_grpc_error,
    known_reason,
    rich_status,
    status_code,
)
from services.mesh.errors import ResourceExhausted, ServiceError, service_error_status
from services.mesh.faults import FaultInjector

log = logging.getLogger("paymesh.access")

_GRPC_INFRA = ("/grpc.health.", "/grpc.reflection.")
_HEALTH = "/grpc.health."
#: How long a shed caller is told to wait before trying again (google.rpc.RetryInfo).
SHED_RETRY_DELAY_S = 0.25

CallObserver = Callable[[str, grpc.StatusCode, float], None]
#: What a server interceptor calls to reach the next one (or the handler) for a call.
#: (A string: grpc's RpcMethodHandler is generic only to type checkers.)
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)
#: The trace context to serve a call in, from its invocation metadata (None: leave it as is).
TraceContextOf = Callable[[Collection[tuple[str, str | bytes]] | None], otel_context.Context | None]

#: Codes that say the service (or one below it) failed, not the caller: WARNING, not INFO.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)


class Registrar:
    """Stands for an aio server while servicers register: puts each handler behind ``policy``."""

    def __init__(self, server: aio.Server, policy: ServerPolicyInterceptor) -> None:
        self._server = server
        self._policy = policy

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """As ``aio.Server.add_generic_rpc_handlers``, each handler behind the policy."""
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedLookup(handler, self._policy) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """As ``aio.Server.add_registered_method_handlers``, each handler behind the policy."""
        wrap = self._policy.wrap
        guarded = {name: wrap(h, f"/{service_name}/{name}") for name, h in handlers.items()}
        self._server.add_registered_method_handlers(
            service_name, {name: h for name, h in guarded.items() if h is not None}
        )


class _GuardedLookup(grpc.GenericRpcHandler):
    """A generic handler whose handlers are found behind the policy (wrapped once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, policy: ServerPolicyInterceptor) -> None:
        self._inner = inner
        self._policy = policy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = self._inner.service(handler_call_details)
        return self._policy.wrap(found, handler_call_details.method)


class Admitted(Protocol):
    """A gate's decision for one admitted call."""

    @property
    def caller(self) -> str:
        """Who is calling, for the access log."""

    def reset(self) -> None:
        """Undo what admission set for the servicer (the authenticated merchant)."""


class Gate(Protocol):
    """Authorization of incoming calls on the verified caller (``services.mesh.authz.CallGate``)."""

    def admit_now(self, method: str, context: Any) -> Admitted | None:
        """Decide without awaiting (a mesh identity): admit, raise a ServiceError, or None
        when the decision needs :meth:`admit` (an API key to check)."""

    async def admit(self, method: str, context: Any) -> Admitted:
        """Admit the call, or raise a ServiceError saying why not."""

    def check_stream(self, method: str, context: Any) -> None:
        """The check of gRPC's own streams (reflection): raise a ServiceError to refuse."""


class ServerPolicyInterceptor(aio.ServerInterceptor):
    """Captures the deadline, maps exceptions to rich status and logs one line per call.

    Either an aio interceptor, or (cheaper: no await nor handler made per call) put on the
    handlers as they are registered, through :meth:`registering_on`.
    """

    def __init__(
        self,
        *,
        domain: str,
        clock: Callable[[], float] = time.monotonic,
        observers: tuple[CallObserver, ...] = (),
        faults: FaultInjector | None = None,
        gate: Gate | None = None,
        max_in_flight: int | None = None,
        on_shed: Callable[[str], None] | None = None,
        prechecks: Mapping[str, Callable[[], None]] | None = None,
        access_log_sample: float = 0.0,
        random_fraction: Callable[[], float] = random.random,
        trace_context: TraceContextOf | None = None,
    ) -> None:
        """``max_in_flight`` caps the calls served at once (None: no cap); ``on_shed`` is told
        the method of each call refused for it; ``prechecks`` maps a full method path to a
        check run before the gate, which raises a ServiceError to refuse the call;
        ``access_log_sample`` is the fraction of successful calls logged at INFO (all of
        them at DEBUG; failed calls always); ``trace_context`` gives the context a unary call
        is served in when no tracing interceptor made a span for it
        (``services.mesh.tracing.server_tracing``)."""
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not 0.0 <= access_log_sample <= 1.0:
            raise ValueError(f"access_log_sample must be from 0 to 1, got {access_log_sample}")
        self._access_log_sample = access_log_sample
        self._random_fraction = random_fraction
        self._domain = domain
        self._faults = faults
        self._clock = clock
        self._observers = observers
        self._gate = gate
        self._max_in_flight = max_in_flight
        self._on_shed = on_shed
        # Read at each call (not copied): a service registers its prechecks while it builds.
        self._prechecks: Mapping[str, Callable[[], None]] = {} if prechecks is None else prechecks
        self._trace_context = trace_context
        self._in_flight = 0
        #: Full method path -> (the handler found, the same behind this policy): made once.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    @property
    def in_flight(self) -> int:
        """Calls being served right now."""
        return self._in_flight

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self.wrap(await continuation(handler_call_details), handler_call_details.method)

    def registering_on(self, server: aio.Server) -> Registrar:
        """What to pass to ``add_XxxServicer_to_server`` instead of ``server``: the handlers
        reach ``server`` behind this policy, so no aio interceptor runs per call."""
        return Registrar(server, self)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """``handler`` of ``method`` behind this policy (None stays None: UNIMPLEMENTED)."""
        if handler is None:
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrapped_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrapped_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # Health and reflection are gRPC's own long-lived streams: they carry no domain
        # errors, and wrapping them turns their cancellation at shutdown into logged noise.
        if method.startswith(_GRPC_INFRA):
            if self._gate is None or method.startswith(_HEALTH):
                return handler
            return self._guarded_stream(handler, method)
        intercept = self.intercept
        options: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        behaviour: Any
        if not handler.response_streaming:
            behaviour = handler.unary_unary or handler.stream_unary
            # One coroutine per call, the policy's own (a partial of a coroutine function is
            # one to grpc.aio too).
            unary = functools.partial(self.serve, method, behaviour)
            if handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(unary, **options)
            return grpc.unary_unary_rpc_method_handler(unary, **options)
        behaviour = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            responses = await intercept(behaviour, request, context, method)
            if responses is None:  # the handler wrote with context.write
                return
            async for response in responses:
                yield response

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **options)
        return grpc.unary_stream_rpc_method_handler(streaming, **options)

    async def intercept(
        self,
        method: Callable[[Any, aio.ServicerContext[Any, Any]], Any],
        request_or_iterator: Any,
        context: aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        """Serve one call of ``method_name`` by ``method`` under the policy."""
        return await self.serve(method_name, method, request_or_iterator, context)

    async def serve(
        self,
        method_name: str,
        method: Callable[[Any, aio.ServicerContext[Any, Any]], Any],
        request_or_iterator: Any,
        context: aio.ServicerContext[Any, Any],
    ) -> Any:
        """:meth:`intercept`, arguments in the order a handler bound to its method takes."""
        started = self._clock()
        token = set_incoming_deadline(context.time_remaining(), clock=self._clock)
        trace_context = self._trace_context
        incoming = None if trace_context is None else trace_context(context.invocation_metadata())
        traced = None if incoming is None else otel_context.attach(incoming)
        admitted: Admitted | None = None
        self._in_flight += 1
        try:
            try:
                if self._max_in_flight is not None and self._in_flight > self._max_in_flight:
                    self._shed(method_name)
                precheck = self._prechecks.get(method_name)
                if precheck is not None:
                    precheck()  # before the gate: refusing must cost no authentication
                gate = self._gate
                if gate is not None:
                    # A mesh caller is decided without a coroutine; an API key is awaited.
                    admitted = gate.admit_now(method_name, context)
                    if admitted is None:
                        admitted = await gate.admit(method_name, context)
                faults = self._faults
                if faults is not None and faults.active:
                    await self._inject(method_name)
                response = method(request_or_iterator, context)
                if hasattr(response, "__aiter__"):
                    # Streams map their errors while iterating.
                    return self._stream(response, context, method_name, started)
                result = await response
            except aio.AbortError:
                raise  # the servicer set its status itself
            except Exception as exc:
                await self._abort(exc, context, method_name, started)
                raise  # unreachable: abort raises
            self._finish(context, method_name, started, grpc.StatusCode.OK)
            return result
        finally:
            self._in_flight -= 1
            if admitted is not None:
                admitted.reset()
            if traced is not None:
                otel_context.detach(traced)
            reset_incoming_deadline(token)

    def _shed(self, method_name: str) -> None:
        if self._on_shed is not None:
            self._on_shed(method_name)
        raise ResourceExhausted(
            f"{self._domain} is at its limit of {self._max_in_flight} calls in flight; "
            f"retry in {SHED_RETRY_DELAY_S:g}s",
            reason=Reason.OVERLOADED,
            retry_delay_s=SHED_RETRY_DELAY_S,
            metadata={"max_in_flight": str(self._max_in_flight)},
        )

    def _guarded_stream(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (reflection, a stream-stream) behind the gate's check of the caller."""
        gate = self._gate
        assert gate is not None
        inner: Any = handler.stream_stream  # typed as sync by grpc-stubs; aio servers are async
        if inner is None:
            return handler

        async def guarded(
            requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                gate.check_stream(method, context)
            except ServiceError as exc:
                status = service_error_status(exc, domain=self._domain)
                context.set_trailing_metadata(((STATUS_DETAILS_KEY, status.SerializeToString()),))
                await context.abort(exc.code, status.message)
            async for item in inner(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _inject(self, method_name: str) -> None:
        assert self._faults is not None
        injection = self._faults.injection(method_name)
        if injection is None:
            return
        if injection.delay_s:
            await asyncio.sleep(injection.delay_s)
        if injection.code is not None:
            error = ServiceError(
                f"fault injected into {method_name}: {injection.code.name}",
                reason=Reason.FAULT_INJECTED,
            )
            error.code = injection.code
            raise error

    async def _stream(
        self,
        response: AsyncIterator[Any],
        context: aio.ServicerContext[Any, Any],
        method_name: str,
        started: float,
    ) -> AsyncIterator[Any]:
        try:
            async for item in response:
                yield item
        except Exception as exc:
            await self._abort(exc, context, method_name, started)
        self._finish(context, method_name, started, grpc.StatusCode.OK)

    async def _abort(
        self,
        exc: Exception,
        context: aio.ServicerContext[Any, Any],
        method_name: str,
        started: float,
    ) -> None:
        status, trailing = self._status_of(exc, method_name)
        code = status_code(status)
        self._finish(context, method_name, started, code, error=status.message)
        metadata = ((STATUS_DETAILS_KEY, status.SerializeToString()), *trailing)
        context.set_trailing_metadata(metadata)
        await context.abort(code, status.message)

    def _status_of(
        self, exc: Exception, method_name: str
    ) -> tuple[status_pb2.Status, tuple[tuple[str, str], ...]]:
        if isinstance(exc, ServiceError):
            trailing: tuple[tuple[str, str], ...] = ()
            if exc.pushback_ms is not None:
                trailing = ((PUSHBACK_KEY, str(exc.pushback_ms)),)
            return service_error_status(exc, domain=self._domain), trailing
        # A downstream call's failure (a typed CallError through the chain) that the
        # servicer let escape.
        if isinstance(exc, grpc.RpcError) and isinstance(exc, aio.AioRpcError | grpc.Call):
            return self._downstream_status(exc)
        log.exception("unhandled error in %s", method_name)
        return (
            rich_status(
                grpc.StatusCode.INTERNAL,
                f"internal error in {self._domain}; the failure was logged",
                domain=self._domain,
                reason=Reason.INTERNAL_ERROR,
            ),
            (),
        )

    def _downstream_status(
        self, exc: grpc.RpcError
    ) -> tuple[status_pb2.Status, tuple[tuple[str, str], ...]]:
        error = from_grpc_error(exc)
        code, details = error.code(), error.details() or ""
        target = error.target or error.domain or "downstream"
        metadata = {"target": target}
        if error.target:  # the chain's facts: only a CallError made by the chain has them
            metadata.update(
                method=error.method, attempts=str(error.attempts), stop_reason=error.stop_reason
            )
        if code.name in DEPENDENCY_FAULT:
            kept = (Reason.CIRCUIT_OPEN, Reason.TLS_HANDSHAKE_FAILED, Reason.CONCURRENCY_LIMITED)
            reason = Reason(error.reason) if error.reason in kept else None
            if error.stop_reason == "breaker_open":
                reason = Reason.CIRCUIT_OPEN
            deadline = isinstance(error, DeadlineExceededError)
            status = rich_status(
                grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.UNAVAILABLE,
                f"{target} failed: {details}",
                domain=self._domain,
                reason=reason
                or (Reason.DEADLINE_EXHAUSTED if deadline else Reason.DOWNSTREAM_UNAVAILABLE),
                metadata=metadata,
            )
            # The layer below already retried as much as the policy allows: tell our
            # callers not to multiply it.
            return status, ((PUSHBACK_KEY, "-1"),)
        reason = known_reason(error.reason, code)
        return (
            rich_status(code, details, domain=self._domain, reason=reason, metadata=metadata),
            (),
        )

    def _finish(
        self,
        context: aio.ServicerContext[Any, Any],
        method_name: str,
        started: float,
        code: grpc.StatusCode,
        *,
        error: str = "",
    ) -> None:
        elapsed = self._clock() - started
        for observe in self._observers:
            observe(method_name, code, elapsed)
        if method_name.startswith("/grpc."):
            return  # health probes and reflection would drown the log
        if code is grpc.StatusCode.OK:
            # The common case costs one level check: no arguments built, no line formatted.
            if log.isEnabledFor(logging.DEBUG):
                level = logging.DEBUG
            elif self._access_log_sample and self._random_fraction() < self._access_log_sample:
                level = logging.INFO
            else:
                return
        else:
            level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
        duration_ms = round(elapsed * 1000, 1)
        log.log(
            level,
            "rpc method=%s code=%s duration_ms=%.1f peer=%s%s",
            method_name,
            code.name,
            duration_ms,
            context.peer(),
            f" error={error!r}" if error else "",
            extra={"method": method_name, "code": code.name, "duration_ms": duration_ms},
        )
