"""The one attempt loop of every outgoing call, whatever its transport (api-core's retry_target).

An adapter (aio, sync, http) hands the loop a transport that makes one attempt and classifies
how it failed; the loop does everything else, once: the call's overall deadline, the breaker's
admission and record, the retry decision (``retry.RetryRun``), the sleep within the deadline,
and every event reported to the runtime's observer (which owns counters and spans).
:func:`run_call` and :func:`run_call_sync` are the same loop; they differ in the await and the
sleep only. No gRPC import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context

from interceptors.breaker import CallRefused, ConcurrencyLimited, Outcome, Permit
from interceptors.deadline import (
    DeadlineExhausted,
    bind_call_deadline,
    outgoing_deadline,
    reset_call_deadline,
    within_incoming,
)
from interceptors.observe import Call
from interceptors.policy import CallPolicy
from interceptors.retry import AttemptFailure, RetryRun, StopReason, breaker_outcome
from interceptors.runtime import AbortableAttempt, Cancellable, ChainRuntime

__all__ = [
    "AsyncTransport",
    "Attempt",
    "Call",
    "SyncTransport",
    "run_call",
    "run_call_sync",
    "stream_timeout",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(slots=True, kw_only=True)
class Attempt:
    """What the loop gives a transport for one attempt."""

    number: int
    """1 for the first attempt."""
    timeout_s: float
    """Seconds left of the call's overall deadline: the attempt's own timeout."""
    policy: CallPolicy
    """The call's policy (``wait_for_ready`` and the like)."""
    trace_context: Context | None
    """Context to propagate with the attempt (``traceparent``); None: nothing to send."""
    span: trace.Span | None
    """The attempt's span, for transport attributes; None when calls are untraced."""
    abortable: AbortableAttempt | None = None
    """Fails the attempt if the breaker opens while it is in flight (async only)."""

    def attach(self, in_flight: Cancellable) -> None:
        """The call or task the attempt waits on, so an opening breaker can cancel it."""
        if self.abortable is not None:
            self.abortable.attach(in_flight)


class Transport(Protocol[T_co]):
    """How an adapter classifies attempts and words the error its caller sees."""

    def classify(self, error: BaseException) -> AttemptFailure | None:
        """The failure an attempt's error stands for; None: not an answer (re-raised as is)."""

    def answer_code(self, result: Any) -> str:
        """Code name of a successful attempt's result (``OK``; an HTTP answer's own code)."""

    def deadline_exhausted(self, problem: str) -> BaseException:
        """The error of a call not sent: nothing was left of the incoming deadline."""

    def refused(self, refusal: CallRefused, attempts: int) -> BaseException:
        """The error of a call whose next attempt the breaker refused."""

    def aborted(self, attempts: int, open_s: float) -> BaseException:
        """The error of a call whose attempt in flight the opening breaker failed."""

    def gave_up(
        self, failure: AttemptFailure, error: BaseException, attempts: int, reason: StopReason
    ) -> BaseException:
        """The error of a call the loop stopped retrying after ``failure``."""


class AsyncTransport(Transport[T_co], Protocol):
    """A transport of coroutines (grpc.aio, aiohttp)."""

    def attempt(self, attempt: Attempt) -> Awaitable[T_co]:
        """Make one attempt: what the loop awaits for its result or its error (a coroutine,
        or the transport's own awaitable call)."""

    async def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        """Called after the backoff sleep, before the next attempt (reconnect waits)."""


class SyncTransport(Transport[T_co], Protocol):
    """A blocking transport (grpc's sync channels)."""

    def attempt(self, attempt: Attempt) -> T_co:
        """Make one attempt; return its result or raise its error."""

    def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        """Called after the backoff sleep, before the next attempt."""


#: What ``_CallRun.failure`` is until an attempt failed (one object: most calls never fail).
_NO_FAILURE = AttemptFailure(code="OK")


class _CallRun:
    """The loop's state and steps for one call, shared by the async and the sync loop.

    The retry bookkeeping (``retry.RetryRun``) is made at the first failure only: a call
    answered at its first attempt (most calls) never needs it."""

    __slots__ = (
        "_token",
        "attempts",
        "breaker",
        "budget",
        "call",
        "deadline",
        "deadline_at",
        "failure",
        "policy",
        "report",
        "retry",
        "runtime",
        "transport",
    )

    def __init__(self, runtime: ChainRuntime, call: Call, transport: Transport[Any]) -> None:
        self.runtime, self.call, self.transport = runtime, call, transport
        route = runtime.route(call.target, call.route or call.method)
        self.policy = route.policy
        self.report = report = runtime.observer.start_call(call)
        try:
            if call.timeout_s is None:
                deadline = within_incoming(
                    route.own_deadline, margin_s=route.margin_s, clock=runtime.clock
                )
            else:
                deadline = outgoing_deadline(
                    call.timeout_s, margin_s=route.margin_s, clock=runtime.clock
                )
        except DeadlineExhausted as exc:
            report.deadline_exhausted()
            report.ended("DEADLINE_EXCEEDED", str(exc), attempts=0, failed=True)
            raise transport.deadline_exhausted(str(exc)) from None
        self.deadline = deadline
        report.deadline_set(deadline)
        # Bound for the call: who asks (deadline_is_callers) learns which deadline won.
        self._token = bind_call_deadline(deadline)
        self.deadline_at = runtime.clock() + deadline.timeout_s
        self.retry: RetryRun | None = None
        """The retry bookkeeping, from the first failure on."""
        self.attempts = 0
        """Attempts started so far."""
        self.breaker = route.breaker
        self.budget = route.budget
        self.failure = _NO_FAILURE
        """The last failure, once there was one."""

    def close(self) -> None:
        reset_call_deadline(self._token)

    def left_s(self) -> float:
        return self.deadline_at - self.runtime.clock()

    def begin(self, abortable: AbortableAttempt | None) -> tuple[Permit, Attempt]:
        """Admit the next attempt through the breaker (or raise the refusal) and start it."""
        report = self.report
        try:
            permit = self.breaker.admit(abortable.abort if abortable is not None else None)
        except CallRefused as refusal:
            sent = self.attempts
            reason: StopReason = (
                "concurrency_limited" if isinstance(refusal, ConcurrencyLimited) else "breaker_open"
            )
            report.attempt_refused(sent + 1, refusal)
            report.stopped(reason, None)
            report.ended("UNAVAILABLE", str(refusal), attempts=sent, failed=True)
            raise self.transport.refused(refusal, sent) from None
        retry = self.retry
        if retry is None:  # the first attempt
            self.attempts = number = 1
            self.budget.record_first_attempt()
            left = self.deadline_at - self.runtime.clock()
        else:
            left = retry.start_attempt()
            self.attempts = number = retry.attempts
        span, context = report.attempt_started(number)
        attempt = Attempt(
            number=number,
            timeout_s=left if left > 0.0 else 0.0,
            policy=self.policy,
            trace_context=context,
            span=span,
            abortable=abortable,
        )
        return permit, attempt

    def answered(self, permit: Permit, result: T) -> T:
        """Record the attempt's answer; the call's result."""
        code = self.transport.answer_code(result)
        if code == "OK":
            self.breaker.record_success(permit)
        else:
            self.breaker.record(
                permit, breaker_outcome(code, deadline_was_callers=self.deadline.propagated)
            )
        report = self.report
        report.attempt_answered(code)
        report.ended(code, "", attempts=self.attempts, failed=False)
        return result

    def _retry_run(self) -> RetryRun:
        retry = self.retry
        if retry is None:
            runtime = self.runtime
            retry = self.retry = RetryRun(
                policy=self.policy.retry,
                safe=self.call.safe,
                deadline_at=self.deadline_at,
                budget=self.budget,
                clock=runtime.clock,
                rng=runtime.rng,
                attempts=self.attempts,
            )
        return retry

    def failed(self, permit: Permit, error: BaseException, *, aborted: bool) -> float:
        """Record a failed attempt; the sleep before the next, or raise what the caller sees."""
        report, sent = self.report, self.attempts
        failure = self.transport.classify(error)
        if aborted and (failure is None or failure.code == "CANCELLED"):
            self.breaker.record(permit, Outcome.IGNORED)  # the breaker's own doing
            open_s = self.breaker.policy.open_s
            report.attempt_aborted(open_s)
            report.stopped("breaker_open", None)
            detail = f"circuit breaker of {self.call.target} opened while the call was in flight"
            report.ended("UNAVAILABLE", detail, attempts=sent, failed=True)
            raise self.transport.aborted(sent, open_s) from None
        if failure is None:  # no answer: the caller cancelled, or a bug below us
            self.breaker.record(permit, Outcome.IGNORED)
            code = "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"
            report.attempt_failed(AttemptFailure(code=code, detail=type(error).__name__))
            report.ended(code, str(error), attempts=sent, failed=True)
            raise error
        self.breaker.record(
            permit,
            breaker_outcome(
                failure.code,
                tls_failed=failure.tls_problem is not None,
                deadline_was_callers=self.deadline.propagated,
            ),
        )
        report.attempt_failed(failure)
        decision = self._retry_run().after_failure(failure)
        if not decision.retry:
            reason = decision.stop_reason or "not_retryable"
            report.stopped(reason, failure)
            report.ended(failure.code, failure.detail, attempts=sent, failed=True)
            raise self.transport.gave_up(failure, error, sent, reason) from error
        self.failure = failure
        report.retry_scheduled(decision.delay_s)
        return decision.delay_s


async def run_call(transport: AsyncTransport[T], call: Call, runtime: ChainRuntime) -> T:
    """Make ``call`` through ``transport``: attempts until an answer or a reason to stop."""
    run = _CallRun(runtime, call, transport)
    loop = asyncio.get_running_loop()
    try:
        while True:
            abortable = AbortableAttempt(loop)
            permit, attempt = run.begin(abortable)
            try:
                result = await transport.attempt(attempt)
            except BaseException as error:
                delay_s = run.failed(permit, error, aborted=abortable.caused())
            else:
                return run.answered(permit, result)
            await runtime.sleep(delay_s)
            await transport.before_retry(run.failure, run.left_s())
    finally:
        run.close()


def run_call_sync(transport: SyncTransport[T], call: Call, runtime: ChainRuntime) -> T:
    """:func:`run_call` for a blocking transport: an attempt in flight cannot be aborted."""
    run = _CallRun(runtime, call, transport)
    try:
        while True:
            permit, attempt = run.begin(None)
            try:
                result = transport.attempt(attempt)
            except BaseException as error:
                delay_s = run.failed(permit, error, aborted=False)
            else:
                return run.answered(permit, result)
            runtime.sync_sleep(delay_s)
            transport.before_retry(run.failure, run.left_s())
    finally:
        run.close()


def stream_timeout(
    runtime: ChainRuntime, target: str, method: str, timeout_s: float | None
) -> float:
    """The one overall deadline of a stream, reported; streams get no retry and no breaker,
    since a stream cannot be replayed safely once messages flowed.

    Raises:
        DeadlineExhausted: nothing is left of the incoming deadline; nothing was sent.
    """
    policy = runtime.policy(target, method)
    try:
        deadline = outgoing_deadline(
            policy.timeout_s if timeout_s is None else timeout_s,
            margin_s=policy.deadline_margin_s,
            clock=runtime.clock,
        )
    except DeadlineExhausted:
        runtime.observer.stream_deadline_exhausted(target, method)
        raise
    runtime.observer.stream_deadline(target, method, propagated=deadline.propagated)
    return deadline.timeout_s
