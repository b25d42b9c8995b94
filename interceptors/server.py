"""Server-side interceptor of every service: deadline capture, error mapping, access log.

One object per concern would cost an extra await per call for nothing: the three share the
call's timing, so one ``AsyncServerInterceptor`` does them in order. A servicer raises domain
errors (``interceptors.errors``); a downstream failure that escapes it becomes UNAVAILABLE
with pushback ``-1`` so that only the bottom layer of the mesh retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc import aio
from grpc_interceptor.server import AsyncServerInterceptor

from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import (
    PUSHBACK_KEY,
    STATUS_DETAILS_KEY,
    ServiceError,
    error_info,
    rich_status,
    service_error_status,
    status_code,
    status_from_metadata,
)
from interceptors.faults import FaultInjector

log = logging.getLogger("paymesh.access")

#: Downstream codes that say the dependency, not the request, is at fault.
_INFRA_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.CANCELLED,
    }
)

_GRPC_INFRA = ("/grpc.health.", "/grpc.reflection.")

CallObserver = Callable[[str, grpc.StatusCode, float], None]


class ServerPolicyInterceptor(AsyncServerInterceptor):
    """Captures the deadline, maps exceptions to rich status and logs one line per call."""

    def __init__(
        self,
        *,
        domain: str,
        clock: Callable[[], float] = time.monotonic,
        observers: tuple[CallObserver, ...] = (),
        faults: FaultInjector | None = None,
    ) -> None:
        self._domain = domain
        self._faults = faults
        self._clock = clock
        self._observers = observers

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # Health and reflection are gRPC's own long-lived streams: they carry no domain
        # errors, and wrapping them turns their cancellation at shutdown into logged noise.
        if handler_call_details.method.startswith(_GRPC_INFRA):
            return await continuation(handler_call_details)
        handler: grpc.RpcMethodHandler[Any, Any] | None = await super().intercept_service(  # type: ignore[no-untyped-call]  # untyped in grpc-interceptor
            continuation, handler_call_details
        )
        return handler

    async def intercept(
        self,
        method: Callable[[Any, aio.ServicerContext[Any, Any]], Any],
        request_or_iterator: Any,
        context: aio.ServicerContext[Any, Any],
        method_name: str,
    ) -> Any:
        started = self._clock()
        token = set_incoming_deadline(context.time_remaining(), clock=self._clock)
        try:
            try:
                if self._faults is not None:
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
            reset_incoming_deadline(token)

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
                reason="FAULT_INJECTED",
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
        # A downstream call's failure (CallError included) that the servicer let escape.
        if isinstance(exc, aio.AioRpcError) or (
            isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call)
        ):
            return self._downstream_status(exc)
        log.exception("unhandled error in %s", method_name)
        return (
            rich_status(
                grpc.StatusCode.INTERNAL,
                f"internal error in {self._domain}; the failure was logged",
                domain=self._domain,
                reason="INTERNAL_ERROR",
            ),
            (),
        )

    def _downstream_status(self, exc: Any) -> tuple[status_pb2.Status, tuple[tuple[str, str], ...]]:
        code: grpc.StatusCode = exc.code()
        details = exc.details() or ""
        peer = status_from_metadata(code, details, exc.trailing_metadata())
        peer_info = error_info(peer)
        target = getattr(exc, "target", None) or (peer_info.domain if peer_info else "downstream")
        metadata = {"target": str(target)}
        for attr in ("method", "attempts", "stop_reason"):
            value = getattr(exc, attr, None)
            if value is not None:
                metadata[attr] = str(value)
        if code in _INFRA_CODES:
            reason = peer_info.reason if peer_info and peer_info.reason == "CIRCUIT_OPEN" else None
            if getattr(exc, "stop_reason", None) == "breaker_open":
                reason = "CIRCUIT_OPEN"
            out = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if code == grpc.StatusCode.DEADLINE_EXCEEDED
                else grpc.StatusCode.UNAVAILABLE
            )
            status = rich_status(
                out,
                f"{target} failed: {details}",
                domain=self._domain,
                reason=reason
                or (
                    "DEADLINE_EXHAUSTED"
                    if out == grpc.StatusCode.DEADLINE_EXCEEDED
                    else "DOWNSTREAM_UNAVAILABLE"
                ),
                metadata=metadata,
            )
            # The layer below already retried as much as the policy allows: tell our
            # callers not to multiply it.
            return status, ((PUSHBACK_KEY, "-1"),)
        reason = peer_info.reason if peer_info else code.name
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
        log.info(
            "rpc method=%s code=%s duration_ms=%.1f peer=%s%s",
            method_name,
            code.name,
            elapsed * 1000,
            context.peer(),
            f" error={error!r}" if error else "",
        )
