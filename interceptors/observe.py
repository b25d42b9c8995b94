"""What the attempt loop reports, behind one interface: every counter, the call log, the spans.

The loop (``attempts.py``) hands each event of a call to that call's :class:`CallReport`
(go-grpc-middleware's ``Reporter``: one per call, ``ended`` its ``PostCall``) and never names
a counter. :class:`ChainObserver` is the implementation every process uses: it owns every
counter name below (``services.mesh.metrics`` exports them, ``services.mesh.recent`` reads
them), the one debug line per call and the attempt spans, so a gRPC and an HTTP call report
the same series for the same events. No gRPC import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from interceptors.breaker import BreakerOpen, CallRefused
from interceptors.codes import NUMBERS
from interceptors.deadline import OutgoingDeadline
from interceptors.retry import AttemptFailure
from interceptors.telemetry import CALLS as CALLS  # the one counter ChainTelemetry keeps itself
from interceptors.telemetry import MAX_BOUND_SERIES, BoundSeries, CallRecord, ChainTelemetry
from interceptors.tracing import (
    circuit_open,
    fail_span,
    recorded_under,
    skips_unsampled,
    start_attempt,
)
from interceptors.tracing import stopped as note_stopped

log = logging.getLogger("paymesh.chain")
Clock = Callable[[], float]

# The counters of the chain (ChainTelemetry series names), one event each; CALLS (finished
# calls, by target, method and final code) is counted by ChainTelemetry.record_call.
#: Attempts sent to a target (first attempts and retries), by target and method.
ATTEMPTS = "attempts_total"
#: Retries scheduled, by target and method.
RETRIES = "retries_total"
#: Calls that failed for good, by target, method and the reason the loop stopped.
RETRY_STOPS = "retry_stops_total"
#: Retries the target's budget refused, by target.
BUDGET_EXHAUSTED = "budget_exhausted_total"
#: Attempts an open breaker refused, by target.
BREAKER_REJECTIONS = "breaker_rejections_total"
#: Attempts refused for the target's limit in flight, by target.
CONCURRENCY_LIMITED = "concurrency_limited_total"
#: Attempts in flight failed because the breaker opened meanwhile, by target.
BREAKER_ABORTED = "breaker_aborted_total"
#: Breaker state changes, by target, old and new state.
BREAKER_TRANSITIONS = "breaker_transitions_total"
#: Breaker trips, by target and the rule that tripped it.
BREAKER_TRIPS = "breaker_trips_total"
#: Calls that ended DEADLINE_EXCEEDED, by target and method.
DEADLINE_EXCEEDED = "deadline_exceeded_total"
#: Calls whose deadline the incoming call's cut short, by target and method.
DEADLINE_PROPAGATED = "deadline_propagated_total"
#: Calls not sent because the incoming deadline was spent, by target and method.
DEADLINE_EXHAUSTED = "deadline_exhausted_total"
#: Calls that failed in the TLS handshake, by target.
TLS_HANDSHAKE_FAILURES = "tls_handshake_failures_total"


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """One outgoing call as the loop and its observer know it, whatever the transport."""

    target: str
    """Mesh name of the service or partner called."""
    method: str
    """What counters and logs name it: ``/pkg.Service/Method`` or ``VERB /path`` of a partner."""
    route: str = ""
    """Its ``[methods]`` policy key when not ``method`` (``/<partner>/<VERB> <path>``)."""
    safe: bool
    """Whether repeating it is safe (idempotent, or deduplicated by a request id)."""
    timeout_s: float | None = None
    """The caller's explicit timeout; None: the policy's."""
    attempt_name: str
    """Name of its attempt spans."""
    rpc_system: Literal["grpc", "http"] = "grpc"
    """Its transport, for the span attributes only."""


class CallReport(Protocol):
    """The events of one call, in the order the loop reports them."""

    def deadline_set(self, deadline: OutgoingDeadline) -> None:
        """The call's one overall deadline was set."""

    def deadline_exhausted(self) -> None:
        """Nothing was left of the incoming deadline: the call is not sent."""

    def attempt_refused(self, number: int, refusal: CallRefused) -> None:
        """The breaker refused attempt ``number`` (open, or the limit in flight reached)."""

    def attempt_started(self, number: int) -> tuple[trace.Span | None, Context | None]:
        """Attempt ``number`` is sent; its span (None: untraced) and the context to propagate."""

    def attempt_answered(self, code: str) -> None:
        """The attempt got an answer (``OK``, or an HTTP answer below 5xx)."""

    def attempt_failed(self, failure: AttemptFailure) -> None:
        """The attempt failed as ``failure`` says."""

    def attempt_aborted(self, open_s: float) -> None:
        """The breaker opened while the attempt was in flight and failed it."""

    def retry_scheduled(self, delay_s: float) -> None:
        """Another attempt follows after ``delay_s``."""

    def stopped(self, reason: str, failure: AttemptFailure | None) -> None:
        """The loop gave up for ``reason`` after ``failure`` (None: nothing was answered)."""

    def ended(self, code: str, error: str, *, attempts: int, failed: bool) -> None:
        """The call ended with ``code`` after ``attempts`` sent; ``failed``: it raised."""


class Observer(Protocol):
    """Where the loop and the breakers report; one per process (the chain's runtime)."""

    def start_call(self, call: Call) -> CallReport:
        """A report for one call that starts now."""

    def stream_deadline(self, target: str, method: str, *, propagated: bool) -> None:
        """A stream got its deadline (streams are not retried: see ``attempts.stream_timeout``)."""

    def stream_deadline_exhausted(self, target: str, method: str) -> None:
        """A stream was not opened: nothing was left of the incoming deadline."""

    def breaker_transition(self, target: str, old: str, new: str) -> None:
        """The breaker of ``target`` changed state."""

    def breaker_tripped(self, target: str, rule: str) -> None:
        """A rule (``breaker.TRIP_RULES``) opened the breaker of ``target``."""


class ChainObserver:
    """Counters into :class:`ChainTelemetry`, attempt spans, one debug line per call."""

    def __init__(
        self,
        *,
        telemetry: ChainTelemetry,
        tracer: trace.Tracer,
        trace_calls: bool,
        clock: Clock = time.monotonic,
    ) -> None:
        self.telemetry = telemetry
        self.tracer = tracer
        self.trace_calls = trace_calls
        self.clock = clock
        #: Under a parent-based sampler a call below an unsampled parent records nothing: it
        #: gets no attempt span, and propagates its parent's context unchanged.
        self.skips_unsampled = skips_unsampled(tracer)
        self._bound: dict[tuple[str, str, str], BoundSeries] = {}

    def start_call(self, call: Call) -> CallReport:
        return _ChainCallReport(self, call)

    def count_attempt(self, target: str, method: str) -> None:
        """One attempt sent (the counter of every call)."""
        self.count(ATTEMPTS, target, method)

    def count(self, name: str, target: str, method: str) -> None:
        """One more in series ``name`` of ``target`` and ``method``: the per-call series,
        resolved once per target and method."""
        key = (name, target, method)
        series = self._bound.get(key)
        if series is None:
            series = self.telemetry.bound(name, target=target, method=method)
            if len(self._bound) < MAX_BOUND_SERIES:
                self._bound[key] = series
        self.telemetry.add(series)

    def stream_deadline(self, target: str, method: str, *, propagated: bool) -> None:
        if propagated:
            self.telemetry.inc(DEADLINE_PROPAGATED, target=target, method=method)

    def stream_deadline_exhausted(self, target: str, method: str) -> None:
        self.telemetry.inc(DEADLINE_EXHAUSTED, target=target, method=method)

    def breaker_transition(self, target: str, old: str, new: str) -> None:
        self.telemetry.inc(BREAKER_TRANSITIONS, target=target, old=old, new=new)

    def breaker_tripped(self, target: str, rule: str) -> None:
        self.telemetry.inc(BREAKER_TRIPS, target=target, rule=rule)


class _ChainCallReport:
    """One call's counters and spans; the call's span is the one current when it started."""

    __slots__ = (
        "_attempt",
        "_call",
        "_call_span",
        "_observer",
        "_started",
        "_stop_reason",
        "_traced",
    )

    def __init__(self, observer: ChainObserver, call: Call) -> None:
        self._observer = observer
        self._call = call
        self._started = observer.clock()
        # The transport's call span (the gRPC instrumentation's, the partner client's), or
        # the incoming call's span when untraced: its trace id still propagates.
        self._call_span = span = (
            trace.get_current_span() if observer.trace_calls else trace.INVALID_SPAN
        )
        self._traced = observer.trace_calls and (
            not observer.skips_unsampled or recorded_under(span)
        )
        self._attempt: trace.Span | None = None
        self._stop_reason: str | None = None

    def _inc(self, name: str, *, per_method: bool = True, **labels: str) -> None:
        if per_method:
            labels["method"] = self._call.method
        labels["target"] = self._call.target
        self._observer.telemetry.inc(name, 1, **labels)

    def deadline_set(self, deadline: OutgoingDeadline) -> None:
        if deadline.propagated:  # most calls of a service handling a call of its own
            call = self._call
            self._observer.count(DEADLINE_PROPAGATED, call.target, call.method)

    def deadline_exhausted(self) -> None:
        self._inc(DEADLINE_EXHAUSTED)
        self._stop_reason = "deadline"

    def _open_attempt(self, number: int) -> trace.Span | None:
        if not self._traced:
            return None
        return start_attempt(
            self._observer.tracer, self._call.attempt_name, target=self._call.target, attempt=number
        )

    def attempt_refused(self, number: int, refusal: CallRefused) -> None:
        if isinstance(refusal, BreakerOpen):
            self._inc(BREAKER_REJECTIONS, per_method=False)
        else:
            self._inc(CONCURRENCY_LIMITED, per_method=False)
        span = self._open_attempt(number)
        if span is not None:
            if isinstance(refusal, BreakerOpen):
                circuit_open(span, target=self._call.target, retry_after_s=refusal.retry_after_s)
            fail_span(span, "UNAVAILABLE", str(refusal), None)
            span.end()

    def attempt_started(self, number: int) -> tuple[trace.Span | None, Context | None]:
        self._observer.count_attempt(self._call.target, self._call.method)
        if self._traced:
            span = self._attempt = self._open_attempt(number)
            if span is not None:
                return span, trace.set_span_in_context(span)
        # The call's span (or, untraced, the incoming call's) is the current one: the loop
        # runs where the call started, so the current context carries it with nothing to copy.
        # Outside any trace (a script, a benchmark) it carries nothing to propagate.
        return None, otel_context.get_current()

    def attempt_answered(self, code: str) -> None:
        span, self._attempt = self._attempt, None
        if span is not None:
            span.end()

    def attempt_failed(self, failure: AttemptFailure) -> None:
        span, self._attempt = self._attempt, None
        if span is not None:
            number = NUMBERS.get(failure.code) if self._call.rpc_system == "grpc" else None
            fail_span(span, failure.code, failure.detail, number)
            span.end()

    def attempt_aborted(self, open_s: float) -> None:
        self._inc(BREAKER_ABORTED, per_method=False)
        span, self._attempt = self._attempt, None
        if span is not None:
            circuit_open(span, target=self._call.target, retry_after_s=open_s)
            fail_span(span, "UNAVAILABLE", "the breaker opened while in flight", None)
            span.end()

    def retry_scheduled(self, delay_s: float) -> None:
        self._inc(RETRIES)

    def stopped(self, reason: str, failure: AttemptFailure | None) -> None:
        self._stop_reason = reason
        self._inc(RETRY_STOPS, reason=reason)
        if reason == "budget":
            self._inc(BUDGET_EXHAUSTED, per_method=False)
        if failure is not None and failure.tls_problem is not None:
            self._inc(TLS_HANDSHAKE_FAILURES, per_method=False)
            log.warning(
                "TLS handshake with %s failed (%s): %s",
                self._call.target,
                self._call.method,
                failure.tls_problem,
            )

    def ended(self, code: str, error: str, *, attempts: int, failed: bool) -> None:
        call, duration = self._call, self._observer.clock() - self._started
        self._observer.telemetry.record_call(
            CallRecord(
                target=call.target, method=call.method, code=code, duration_s=duration, error=error
            )
        )
        if code == "DEADLINE_EXCEEDED":
            self._inc(DEADLINE_EXCEEDED)
        if self._traced:
            if attempts > 1 or failed:
                note_stopped(self._call_span, attempts=attempts, reason=self._stop_reason)
            if failed:
                fail_span(self._call_span, code, error, None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "call target=%s method=%s code=%s duration_ms=%.1f",
                call.target,
                call.method,
                code,
                duration * 1000,
            )
