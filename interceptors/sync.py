"""The sync adapter (scripts and tools): the same layers as grpc-interceptor ClientInterceptors.

For ``grpc.intercept_channel(channel, *chain.sync_interceptors(target))``. A sync
continuation *returns* a failed call (or the error an inner layer raised) instead of
raising it, so each layer inspects what it got back. Retry and breaker act on unary-unary
calls only; streams get the deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio
from grpc_interceptor import ClientCallDetails, ClientInterceptor

from interceptors.aio import PREVIOUS_ATTEMPTS_KEY, attempt_failure, attempt_outcome, give_up
from interceptors.breaker import BreakerOpen, ConcurrencyLimited, Outcome
from interceptors.deadline import (
    DeadlineExhausted,
    OutgoingDeadline,
    bind_call_deadline,
    outgoing_deadline,
    reset_call_deadline,
)
from interceptors.errors import CallError, circuit_open_error, concurrency_limited_error
from interceptors.retry import RetryRun
from interceptors.runtime import ChainRuntime
from interceptors.safety import method_name, request_is_safe
from interceptors.telemetry import CallRecord

log = logging.getLogger("paymesh.chain")

Method = Callable[[Any, grpc.ClientCallDetails], Any]


def _details(details: grpc.ClientCallDetails, **changes: Any) -> ClientCallDetails:
    fields: dict[str, Any] = {
        "method": details.method,
        "timeout": details.timeout,
        "metadata": details.metadata,
        "credentials": details.credentials,
        "wait_for_ready": details.wait_for_ready,
        "compression": getattr(details, "compression", None),
    }
    fields.update(changes)
    return ClientCallDetails(**fields)


def _settled(outcome: Any) -> Any:
    """Raise what an inner layer raised (the continuation returned it); else the call."""
    if isinstance(outcome, CallError):
        raise outcome
    return outcome


class _SyncLayer(ClientInterceptor):
    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target

    # Streams bypass retry and breaker: replaying a stream is not safe once messages flowed.
    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)


class SyncTelemetryInterceptor(_SyncLayer):
    """Outermost: one count per call with its final code."""

    def intercept(self, method: Method, request: Any, call_details: grpc.ClientCallDetails) -> Any:
        name = method_name(call_details.method)
        started = self.runtime.clock()
        outcome = method(request, call_details)
        code = outcome.code()
        self.runtime.telemetry.record_call(
            CallRecord(
                target=self.target,
                method=name,
                code=code.name,
                duration_s=self.runtime.clock() - started,
                error="" if code == grpc.StatusCode.OK else outcome.details() or "",
            )
        )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.runtime.telemetry.inc("deadline_exceeded_total", target=self.target, method=name)
        return _settled(outcome)


class SyncDeadlineInterceptor(_SyncLayer):
    """Gives every call its one overall deadline, propagated from the incoming call.

    Which bound won stays bound for the inner layers (see the aio DeadlineInterceptor).
    """

    def _apply(self, details: grpc.ClientCallDetails) -> tuple[ClientCallDetails, OutgoingDeadline]:
        name = method_name(details.method)
        policy = self.runtime.policy(self.target, name)
        timeout = details.timeout if details.timeout is not None else policy.timeout_s
        try:
            deadline = outgoing_deadline(
                timeout, margin_s=policy.deadline_margin_s, clock=self.runtime.clock
            )
        except DeadlineExhausted as exc:
            self.runtime.telemetry.inc("deadline_exhausted_total", target=self.target, method=name)
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                str(exc),
                target=self.target,
                method=name,
                attempts=0,
                stop_reason="deadline",
            ) from None
        if deadline.propagated:
            self.runtime.telemetry.inc("deadline_propagated_total", target=self.target, method=name)
        wait = (
            details.wait_for_ready if details.wait_for_ready is not None else policy.wait_for_ready
        )
        return _details(details, timeout=deadline.timeout_s, wait_for_ready=wait), deadline

    def intercept(self, method: Method, request: Any, call_details: grpc.ClientCallDetails) -> Any:
        details, deadline = self._apply(call_details)
        token = bind_call_deadline(deadline)
        try:
            return _settled(method(request, details))
        finally:
            reset_call_deadline(token)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._apply(details)[0], request)


class SyncRetryInterceptor(_SyncLayer):
    """Repeats a failed attempt only when safe, within the deadline and the target's budget."""

    def intercept(self, method: Method, request: Any, call_details: grpc.ClientCallDetails) -> Any:
        runtime, name = self.runtime, method_name(call_details.method)
        policy = runtime.policy(self.target, name)
        timeout = call_details.timeout if call_details.timeout is not None else policy.timeout_s
        run = RetryRun(
            policy=policy.retry,
            safe=request_is_safe(name, request),
            deadline_at=runtime.clock() + timeout,
            budget=runtime.budget(self.target),
            clock=runtime.clock,
            rng=runtime.rng,
        )
        base = tuple((k, v) for k, v in (call_details.metadata or ()) if k != PREVIOUS_ATTEMPTS_KEY)
        wait_for_ready = call_details.wait_for_ready
        while True:
            left = run.start_attempt()
            metadata = (
                (*base, (PREVIOUS_ATTEMPTS_KEY, str(run.attempts - 1)))
                if run.attempts > 1
                else base
            )
            attempt = _details(
                call_details, timeout=left, metadata=metadata, wait_for_ready=wait_for_ready
            )
            runtime.telemetry.inc("attempts_total", target=self.target, method=name)
            outcome = method(request, attempt)
            if isinstance(outcome, CallError):  # the breaker refused this attempt
                outcome.attempts += run.attempts - 1
                runtime.telemetry.inc(
                    "retry_stops_total", target=self.target, method=name, reason=outcome.stop_reason
                )
                raise outcome
            code = outcome.code()
            if code == grpc.StatusCode.OK:
                return outcome
            text, trailing = outcome.details() or "", tuple(outcome.trailing_metadata() or ())
            failure = attempt_failure(code, text, trailing)
            decision = run.after_failure(failure)
            if not decision.retry:
                reason = decision.stop_reason or "not_retryable"
                runtime.telemetry.inc(
                    "retry_stops_total", target=self.target, method=name, reason=reason
                )
                if reason == "budget":
                    runtime.telemetry.inc("budget_exhausted_total", target=self.target)
                raise give_up(
                    runtime=runtime,
                    code=code,
                    details=text,
                    trailing=aio.Metadata.from_tuple(trailing),
                    target=self.target,
                    method=name,
                    run=run,
                    reason=reason,
                    failure=failure,
                )
            runtime.telemetry.inc("retries_total", target=self.target, method=name)
            if code == grpc.StatusCode.UNAVAILABLE:
                wait_for_ready = True  # see RetryInterceptor: wait out grpcio's reconnect backoff
            runtime.sync_sleep(decision.delay_s)


class SyncBreakerInterceptor(_SyncLayer):
    """Innermost: every attempt passes the target's breaker; open fails fast, locally.

    So does a target with its limit of attempts in flight. A blocking call cannot be failed
    from outside, so, unlike the aio adapter's, an attempt in flight when the breaker opens
    waits for its answer or its deadline.
    """

    def intercept(self, method: Method, request: Any, call_details: grpc.ClientCallDetails) -> Any:
        breaker = self.runtime.breakers.get(self.target)
        try:
            permit = breaker.admit()
        except BreakerOpen as exc:
            self.runtime.telemetry.inc("breaker_rejections_total", target=self.target)
            raise circuit_open_error(
                caller=self.runtime.caller,
                target=self.target,
                method=method_name(call_details.method),
                retry_after_s=exc.retry_after_s,
            ) from None
        except ConcurrencyLimited as exc:
            self.runtime.telemetry.inc("concurrency_limited_total", target=self.target)
            raise concurrency_limited_error(
                caller=self.runtime.caller,
                target=self.target,
                method=method_name(call_details.method),
                limit=exc.limit,
                retry_after_s=exc.retry_after_s,
            ) from None
        result = Outcome.IGNORED
        try:
            outcome = method(request, call_details)
            code = outcome.code()
            result = (
                Outcome.SUCCESS
                if code == grpc.StatusCode.OK
                else attempt_outcome(code, outcome.details() or "")
            )
            return outcome
        finally:
            breaker.record(permit, result)


def sync_chain(runtime: ChainRuntime, target: str) -> list[ClientInterceptor]:
    """The interceptors of one target's sync channel, outermost first."""
    return [
        SyncTelemetryInterceptor(runtime, target),
        SyncDeadlineInterceptor(runtime, target),
        SyncRetryInterceptor(runtime, target),
        SyncBreakerInterceptor(runtime, target),
    ]
