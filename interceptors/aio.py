"""The grpc.aio adapter: one client interceptor per layer, over the transport-agnostic core.

Outermost first: telemetry -> deadline -> retry -> breaker -> the call. Each layer is a
``UnaryUnaryClientInterceptor`` of its own, composed into one channel interceptor
(:class:`PolicyInterceptor`) so a call pays grpc.aio's interception cost once; the stream
interceptor is a separate object (grpc.aio applies an object implementing several call kinds
to unary-unary only, grpc issue 31442). Streams get the call span and the deadline only,
since a stream cannot be replayed safely once messages flowed. Spans: the telemetry
layer runs inside the instrumentation's call span, the retry layer opens one per attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from interceptors.breaker import BreakerOpen, ConcurrencyLimited, Outcome
from interceptors.deadline import (
    DeadlineExhausted,
    OutgoingDeadline,
    bind_call_deadline,
    deadline_is_callers,
    outgoing_deadline,
    reset_call_deadline,
)
from interceptors.errors import (
    PUSHBACK_KEY,
    CallError,
    circuit_open_error,
    concurrency_limited_error,
    retry_delay_of,
    status_from_metadata,
)
from interceptors.retry import AttemptFailure, RetryRun, breaker_outcome
from interceptors.runtime import AbortableAttempt, ChainRuntime
from interceptors.safety import method_name, request_is_safe
from interceptors.telemetry import CallRecord
from interceptors.tls import grpc_tls_problem, tls_handshake_error
from interceptors.tracing import (
    circuit_open,
    client_interceptors,
    fail_span,
    inject,
    propagation_fields,
    start_attempt,
    stopped,
)

log = logging.getLogger("paymesh.chain")

#: Metadata key gRPC's own retries send with the number of earlier attempts.
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"

Continuation = Callable[[aio.ClientCallDetails, Any], Awaitable[Any]]


def attempt_failure(
    code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]] | None
) -> AttemptFailure:
    """The core's view of a failed attempt: code, pushback, RetryInfo, TLS handshake failure."""
    pushback: int | None = None
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                pushback = int(text)
            except ValueError:
                pushback = -1  # unreadable pushback: gRPC treats it as "do not retry"
    delay = retry_delay_of(status_from_metadata(code, details, tuple(trailing or ())))
    return AttemptFailure(
        code=code.name,
        pushback_ms=pushback,
        retry_delay_s=delay,
        tls_problem=grpc_tls_problem(code, details),
    )


def attempt_outcome(code: grpc.StatusCode, details: str) -> Outcome:
    """How a finished attempt counts for the breaker, with what only the adapter can see."""
    return breaker_outcome(
        code.name,
        tls_failed=grpc_tls_problem(code, details) is not None,
        deadline_was_callers=deadline_is_callers(),
    )


def give_up(
    *,
    runtime: ChainRuntime,
    code: grpc.StatusCode,
    details: str,
    trailing: Any,
    target: str,
    method: str,
    run: RetryRun,
    reason: str,
    failure: AttemptFailure,
) -> CallError:
    """The error a caller sees when the chain stops (a TLS failure is reported as such)."""
    if failure.tls_problem is not None:
        return tls_handshake_error(
            runtime,
            target=target,
            method=method,
            problem=failure.tls_problem,
            attempts=run.attempts,
        )
    return CallError(
        code,
        details,
        target=target,
        method=method,
        attempts=run.attempts,
        stop_reason=reason,
        trailing_metadata=trailing
        if isinstance(trailing, aio.Metadata)
        else aio.Metadata.from_tuple(trailing or ()),
    )


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


#: How long a retry after UNAVAILABLE waits for the target's channel to (re)connect. It covers
#: grpcio's reconnect backoff (capped at this in chain.RECONNECT_OPTIONS) without letting a
#: target that is really down hold the call for its whole deadline.
RECONNECT_WAIT_S = 1.0


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


class _Layer:
    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target


class TelemetryInterceptor(_Layer, aio.UnaryUnaryClientInterceptor):
    """Outermost: the call's span and, inside it, one count (and one debug line) per call."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        super().__init__(runtime, target)
        self._traced = (
            client_interceptors(runtime.tracer_provider)[0] if runtime.trace_calls else None
        )

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        opened: list[trace.Span] = []
        parent = trace.get_current_span()
        if self._traced is None:
            return await self._counted(continuation, parent, opened, client_call_details, request)
        counted = functools.partial(self._counted, continuation, parent, opened)
        try:
            return await self._traced.intercept_unary_unary(counted, client_call_details, request)
        except BaseException as exc:
            # The instrumentation ends its span when the call object completes, but this chain
            # raises failures instead of returning a failed call: end the span here, after it
            # recorded the error (it records an RpcError only).
            for span in opened:
                if not isinstance(exc, grpc.RpcError):
                    fail_span(span, type(exc).__name__, str(exc), None)
                span.end()
            raise

    async def _counted(
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
        method = method_name(client_call_details.method)
        telemetry, clock = self.runtime.telemetry, self.runtime.clock
        started = clock()
        code, error = grpc.StatusCode.OK, ""
        try:
            call = await continuation(client_call_details, request)
            await call
            return call
        except aio.AioRpcError as err:
            code, error = err.code(), err.details() or ""
            raise
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
            raise
        finally:
            telemetry.record_call(
                CallRecord(
                    target=self.target,
                    method=method,
                    code=code.name,
                    duration_s=clock() - started,
                    error=error,
                )
            )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                telemetry.inc("deadline_exceeded_total", target=self.target, method=method)
            log.debug(
                "call target=%s method=%s code=%s duration_ms=%.1f",
                self.target,
                method,
                code.name,
                (clock() - started) * 1000,
            )


class _DeadlineLayer(_Layer):
    def _details(
        self, details: aio.ClientCallDetails
    ) -> tuple[aio.ClientCallDetails, OutgoingDeadline]:
        method = method_name(details.method)
        policy = self.runtime.policy(self.target, method)
        timeout = details.timeout if details.timeout is not None else policy.timeout_s
        try:
            deadline = outgoing_deadline(
                timeout, margin_s=policy.deadline_margin_s, clock=self.runtime.clock
            )
        except DeadlineExhausted as exc:
            self.runtime.telemetry.inc(
                "deadline_exhausted_total", target=self.target, method=method
            )
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                str(exc),
                target=self.target,
                method=method,
                attempts=0,
                stop_reason="deadline",
            ) from None
        if deadline.propagated:
            self.runtime.telemetry.inc(
                "deadline_propagated_total", target=self.target, method=method
            )
        wait = (
            details.wait_for_ready if details.wait_for_ready is not None else policy.wait_for_ready
        )
        return replace_details(details, timeout=deadline.timeout_s, wait_for_ready=wait), deadline


class DeadlineInterceptor(_DeadlineLayer, aio.UnaryUnaryClientInterceptor):
    """Gives every call its one overall deadline, propagated from the incoming call.

    Which bound won stays bound for the inner layers: the breaker ignores a DEADLINE_EXCEEDED
    when it was the caller's deadline that ran out.
    """

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        details, deadline = self._details(client_call_details)
        token = bind_call_deadline(deadline)
        try:
            return await continuation(details, request)
        finally:
            reset_call_deadline(token)


class StreamDeadlineInterceptor(_DeadlineLayer, aio.UnaryStreamClientInterceptor):
    """The span and deadline of server-streaming calls (one object per call kind)."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        super().__init__(runtime, target)
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
        details, _ = self._details(client_call_details)
        return await continuation(details, request)


class RetryInterceptor(_Layer, aio.UnaryUnaryClientInterceptor):
    """Repeats a failed attempt only when safe, within the deadline and the target's budget.

    Each attempt is a child span of the call's span and carries its own ``traceparent``.
    """

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        super().__init__(runtime, target)
        #: Dropped from the call's metadata: each attempt sends its own.
        self._replaced_keys = propagation_fields() | {PREVIOUS_ATTEMPTS_KEY}

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        runtime, details = self.runtime, client_call_details
        method = method_name(details.method)
        call_span = trace.get_current_span()
        attempt_name = method.lstrip("/") + " attempt"
        policy = runtime.policy(self.target, method)
        timeout = details.timeout if details.timeout is not None else policy.timeout_s
        run = RetryRun(
            policy=policy.retry,
            safe=request_is_safe(method, request),
            deadline_at=runtime.clock() + timeout,
            budget=runtime.budget(self.target),
            clock=runtime.clock,
            rng=runtime.rng,
        )
        replaced = self._replaced_keys
        base = [(k, v) for k, v in (details.metadata or ()) if k not in replaced]
        # Untraced and outside any trace (a script, a benchmark): nothing to propagate.
        propagating = runtime.trace_calls or call_span.get_span_context().is_valid
        wait_for_ready = details.wait_for_ready
        waited_for_connection = False
        while True:
            left = run.start_attempt()
            span = (
                start_attempt(
                    runtime.tracer, attempt_name, target=self.target, attempt=run.attempts
                )
                if runtime.trace_calls
                else call_span  # no span of its own: the incoming call's trace id goes on
            )
            metadata = aio.Metadata(*base)
            if run.attempts > 1:
                metadata.add(PREVIOUS_ATTEMPTS_KEY, str(run.attempts - 1))
            if propagating:
                inject(metadata, trace.set_span_in_context(span))
            attempt = replace_details(
                details, timeout=left, metadata=metadata, wait_for_ready=wait_for_ready
            )
            runtime.telemetry.inc("attempts_total", target=self.target, method=method)
            try:
                if span is call_span:  # already the current span
                    call = await continuation(attempt, request)
                    await call
                else:
                    with trace.use_span(
                        span, record_exception=False, set_status_on_exception=False
                    ):
                        call = await continuation(attempt, request)
                        await call
                if run.attempts > 1:
                    stopped(call_span, attempts=run.attempts)
                return call
            except CallError as err:  # raised below us: the breaker refused or failed it
                err.attempts += run.attempts - 1  # it counted the attempt if it was sent
                runtime.telemetry.inc(
                    "retry_stops_total", target=self.target, method=method, reason=err.stop_reason
                )
                stopped(call_span, attempts=err.attempts, reason=err.stop_reason)
                raise
            except aio.AioRpcError as err:
                code, text, trailing = err.code(), err.details() or "", err.trailing_metadata()
                fail_span(span, code.name, text, code.value[0])
                failure = attempt_failure(code, text, trailing)
                decision = run.after_failure(failure)
                if not decision.retry:
                    reason = decision.stop_reason or "not_retryable"
                    runtime.telemetry.inc(
                        "retry_stops_total", target=self.target, method=method, reason=reason
                    )
                    if reason == "budget":
                        runtime.telemetry.inc("budget_exhausted_total", target=self.target)
                    stopped(call_span, attempts=run.attempts, reason=reason)
                    raise give_up(
                        runtime=runtime,
                        code=code,
                        details=text,
                        trailing=trailing,
                        target=self.target,
                        method=method,
                        run=run,
                        reason=reason,
                        failure=failure,
                    ) from err
            finally:
                if span is not call_span:
                    span.end()
            runtime.telemetry.inc("retries_total", target=self.target, method=method)
            await runtime.sleep(decision.delay_s)
            if code == grpc.StatusCode.UNAVAILABLE and not waited_for_connection:
                # A reconnecting channel fails calls at once; wait once, briefly, for it to
                # connect instead of burning the retries out in grpcio's reconnect backoff.
                waited_for_connection = True
                waiter = runtime.connection_waiters.get(self.target)
                if waiter is None:
                    wait_for_ready = True  # a channel we did not make: bounded by the deadline
                else:
                    left = run.deadline_at - runtime.clock()
                    await waiter(max(0.0, min(RECONNECT_WAIT_S, left)))


class BreakerInterceptor(_Layer, aio.UnaryUnaryClientInterceptor):
    """Innermost: every attempt passes the target's breaker; open fails fast, locally.

    So does a target with its limit of attempts in flight. When the breaker opens, the
    attempts still in flight are cancelled and fail as CIRCUIT_OPEN: nobody waits for a
    target judged unhealthy (a hung one would hold each until its deadline).
    """

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        breaker = self.runtime.breakers.get(self.target)
        abortable = AbortableAttempt(asyncio.get_running_loop())
        try:
            permit = breaker.admit(abortable.abort)
        except BreakerOpen as exc:
            method = method_name(client_call_details.method)
            self.runtime.telemetry.inc("breaker_rejections_total", target=self.target)
            span = trace.get_current_span()
            circuit_open(span, target=self.target, retry_after_s=exc.retry_after_s)
            fail_span(span, grpc.StatusCode.UNAVAILABLE.name, str(exc), None)
            raise circuit_open_error(
                caller=self.runtime.caller,
                target=self.target,
                method=method,
                retry_after_s=exc.retry_after_s,
            ) from None
        except ConcurrencyLimited as exc:
            self.runtime.telemetry.inc("concurrency_limited_total", target=self.target)
            fail_span(trace.get_current_span(), grpc.StatusCode.UNAVAILABLE.name, str(exc), None)
            raise concurrency_limited_error(
                caller=self.runtime.caller,
                target=self.target,
                method=method_name(client_call_details.method),
                limit=exc.limit,
                retry_after_s=exc.retry_after_s,
            ) from None
        outcome = Outcome.IGNORED  # cancelled, or an error of ours: says nothing of the target
        try:
            call = await continuation(client_call_details, request)
            abortable.attach(call)
            await call
            outcome = Outcome.SUCCESS
            return call
        except aio.AioRpcError as err:
            outcome = attempt_outcome(err.code(), err.details() or "")
            if err.code() == grpc.StatusCode.CANCELLED and abortable.caused():
                raise self._aborted(client_call_details, breaker.policy.open_s) from None
            raise
        except asyncio.CancelledError:
            if not abortable.caused():
                raise  # the caller cancelled: not ours to turn into an error
            raise self._aborted(client_call_details, breaker.policy.open_s) from None
        finally:
            breaker.record(permit, outcome)

    def _aborted(self, details: aio.ClientCallDetails, open_s: float) -> CallError:
        """The error of an attempt failed in flight because the breaker opened meanwhile."""
        self.runtime.telemetry.inc("breaker_aborted_total", target=self.target)
        error = circuit_open_error(
            caller=self.runtime.caller,
            target=self.target,
            method=method_name(details.method),
            retry_after_s=open_s,
            in_flight=True,
        )
        span = trace.get_current_span()
        circuit_open(span, target=self.target, retry_after_s=open_s)
        fail_span(span, grpc.StatusCode.UNAVAILABLE.name, error.details() or "", None)
        return error


class PolicyInterceptor(aio.UnaryUnaryClientInterceptor):
    """The unary layers run as one channel interceptor, outermost first.

    Each grpc.aio interceptor on a channel costs an intercepted-call object and a task per
    call; composing the layers here keeps one of those per call whatever their number,
    while each layer keeps the interceptor signature (and can be tested alone).
    """

    def __init__(self, layers: list[aio.UnaryUnaryClientInterceptor]) -> None:
        self.layers = tuple(layers)

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        call: Continuation = continuation
        for layer in reversed(self.layers):
            call = functools.partial(layer.intercept_unary_unary, call)
        return await call(client_call_details, request)


def aio_chain(runtime: ChainRuntime, target: str) -> list[aio.ClientInterceptor]:
    """The interceptors of one target's channel: the unary layers, then the stream one."""
    unary = PolicyInterceptor(
        [
            TelemetryInterceptor(runtime, target),
            DeadlineInterceptor(runtime, target),
            RetryInterceptor(runtime, target),
            BreakerInterceptor(runtime, target),
        ]
    )
    return [unary, StreamDeadlineInterceptor(runtime, target)]
