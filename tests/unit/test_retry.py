"""Retry decisions with a fake clock: codes, safety, pushback, deadline, attempts, budget."""

from __future__ import annotations

import pytest

from interceptors.breaker import Outcome
from interceptors.budget import RetryBudget
from interceptors.codes import DEFAULT_RETRYABLE
from interceptors.policy import BudgetPolicy, RetryPolicy
from interceptors.retry import AttemptFailure, RetryRun, breaker_outcome
from tests.unit.fakes import FakeClock

BUSINESS = [
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "OUT_OF_RANGE",
]


def make_run(
    clock: FakeClock,
    *,
    safe: bool = True,
    timeout_s: float = 5.0,
    budget: BudgetPolicy | None = None,
    max_attempts: int = 4,
) -> RetryRun:
    run = RetryRun(
        policy=RetryPolicy(max_attempts=max_attempts),
        safe=safe,
        deadline_at=clock() + timeout_s,
        budget=RetryBudget("t", budget or BudgetPolicy(), clock=clock),
        clock=clock,
        rng=lambda: 1.0,
    )
    run.start_attempt()
    return run


def test_unavailable_on_a_safe_call_is_retried() -> None:
    decision = make_run(FakeClock()).after_failure(AttemptFailure(code="UNAVAILABLE"))
    assert decision.retry and decision.delay_s == pytest.approx(0.05)


def test_unsafe_call_is_never_retried() -> None:
    decision = make_run(FakeClock(), safe=False).after_failure(AttemptFailure(code="UNAVAILABLE"))
    assert decision.stop_reason == "not_retryable"


@pytest.mark.parametrize("code", BUSINESS)
def test_business_codes_are_never_retried(code: str) -> None:
    decision = make_run(FakeClock()).after_failure(AttemptFailure(code=code, pushback_ms=10))
    assert decision.stop_reason == "not_retryable"


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "ABORTED"])
def test_pushback_only_codes_need_pushback(code: str) -> None:
    run = make_run(FakeClock())
    assert run.after_failure(AttemptFailure(code=code)).stop_reason == "not_retryable"
    assert run.after_failure(AttemptFailure(code=code, pushback_ms=100)).retry


def test_retry_info_counts_as_pushback() -> None:
    decision = make_run(FakeClock()).after_failure(
        AttemptFailure(code="RESOURCE_EXHAUSTED", retry_delay_s=0.4)
    )
    assert decision.retry and decision.delay_s == 0.4


def test_pushback_delay_replaces_backoff() -> None:
    decision = make_run(FakeClock()).after_failure(
        AttemptFailure(code="UNAVAILABLE", pushback_ms=250)
    )
    assert decision.delay_s == 0.25


def test_negative_pushback_stops() -> None:
    decision = make_run(FakeClock()).after_failure(
        AttemptFailure(code="UNAVAILABLE", pushback_ms=-1)
    )
    assert decision.stop_reason == "pushback"


def test_attempt_deadline_exceeded_is_retried_while_time_remains() -> None:
    clock = FakeClock()
    run = make_run(clock, timeout_s=5.0)
    clock.advance(1.0)
    assert run.after_failure(AttemptFailure(code="DEADLINE_EXCEEDED")).retry


def test_deadline_exceeded_at_the_overall_deadline_stops() -> None:
    clock = FakeClock()
    run = make_run(clock, timeout_s=1.0)
    clock.advance(1.0)
    assert run.after_failure(AttemptFailure(code="DEADLINE_EXCEEDED")).stop_reason == "deadline"


def test_deadline_exceeded_on_unsafe_call_is_not_retried() -> None:
    clock = FakeClock()
    run = make_run(clock, safe=False)
    assert run.after_failure(AttemptFailure(code="DEADLINE_EXCEEDED")).stop_reason == (
        "not_retryable"
    )


def test_backoff_never_sleeps_past_the_deadline() -> None:
    clock = FakeClock()
    run = make_run(clock, timeout_s=1.0)
    clock.advance(0.96)  # 0.04 s left, the next sleep would be 0.05 s
    assert run.after_failure(AttemptFailure(code="UNAVAILABLE")).stop_reason == "deadline"


def test_attempts_are_bounded_by_max_attempts() -> None:
    run = make_run(FakeClock(), max_attempts=2)
    assert run.after_failure(AttemptFailure(code="UNAVAILABLE")).retry
    run.start_attempt()
    assert run.after_failure(AttemptFailure(code="UNAVAILABLE")).stop_reason == (
        "attempts_exhausted"
    )


def test_empty_budget_stops_retries() -> None:
    run = make_run(FakeClock(), budget=BudgetPolicy(retry_ratio=0.0, min_retries=0))
    assert run.after_failure(AttemptFailure(code="UNAVAILABLE")).stop_reason == "budget"


@pytest.mark.parametrize(
    "code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"]
)
def test_infrastructure_codes_count_as_breaker_failures(code: str) -> None:
    assert breaker_outcome(code) is Outcome.FAILURE


@pytest.mark.parametrize("code", [*BUSINESS, "OK"])
def test_business_codes_count_as_breaker_successes(code: str) -> None:
    assert breaker_outcome(code) is Outcome.SUCCESS


def test_cancellation_does_not_count_for_the_breaker() -> None:
    assert breaker_outcome("CANCELLED") is Outcome.IGNORED


def test_deadline_exceeded_on_the_callers_deadline_is_ignored_by_the_breaker() -> None:
    assert breaker_outcome("DEADLINE_EXCEEDED", deadline_was_callers=True) is Outcome.IGNORED


def test_deadline_exceeded_within_the_calls_own_timeout_counts_as_a_failure() -> None:
    assert breaker_outcome("DEADLINE_EXCEEDED", deadline_was_callers=False) is Outcome.FAILURE


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL", "OK"])
def test_the_callers_deadline_changes_only_how_deadline_exceeded_counts(code: str) -> None:
    assert breaker_outcome(code, deadline_was_callers=True) is breaker_outcome(code)


def test_tls_handshake_failure_is_ignored_by_the_breaker() -> None:
    assert breaker_outcome("UNAVAILABLE", tls_failed=True) is Outcome.IGNORED


def test_tls_handshake_failure_is_never_retried() -> None:
    failure = AttemptFailure(code="UNAVAILABLE", tls_problem="CERTIFICATE_VERIFY_FAILED")
    assert make_run(FakeClock()).after_failure(failure).stop_reason == "not_retryable"


def run_with_codes(*codes: str) -> RetryRun:
    clock = FakeClock()
    run = RetryRun(
        policy=RetryPolicy(retryable_codes=frozenset(codes)),
        safe=True,
        deadline_at=clock() + 5.0,
        budget=RetryBudget("t", BudgetPolicy(), clock=clock),
        clock=clock,
        rng=lambda: 1.0,
    )
    run.start_attempt()
    return run


def test_a_code_the_policy_makes_retryable_is_retried() -> None:
    assert run_with_codes("UNAVAILABLE", "INTERNAL").after_failure(AttemptFailure(code="INTERNAL"))


def test_a_code_the_policy_leaves_out_is_not_retried() -> None:
    decision = run_with_codes("DEADLINE_EXCEEDED").after_failure(AttemptFailure(code="UNAVAILABLE"))
    assert decision.stop_reason == "not_retryable"


def test_pushback_only_codes_keep_needing_pushback_whatever_the_retryable_codes() -> None:
    run = run_with_codes("INTERNAL")
    assert run.after_failure(AttemptFailure(code="ABORTED")).stop_reason == "not_retryable"
    assert run.after_failure(AttemptFailure(code="ABORTED", pushback_ms=10)).retry


def test_default_retryable_codes_are_the_tables() -> None:
    assert (
        RetryPolicy().retryable_codes == DEFAULT_RETRYABLE == {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    )
