"""The recent-call window behind the Diagnostics figures: error rate, p99, retries, last error."""

from __future__ import annotations

import pytest

from interceptors.telemetry import CallRecord
from services.mesh.recent import RecentCalls, percentile
from tests.unit.fakes import FakeClock

METHOD = "/paymesh.order.v1.OrderService/GetOrder"


def _call(code: str = "OK", seconds: float = 0.01, error: str = "") -> CallRecord:
    return CallRecord(
        target="order-service", method=METHOD, code=code, duration_s=seconds, error=error
    )


def test_only_codes_that_say_the_target_is_unhealthy_count_as_errors() -> None:
    recent = RecentCalls(clock=FakeClock())
    for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE"):
        recent.record_call(_call(code))

    figures = recent.figures("order-service")

    assert (figures.calls, figures.failures) == (4, 1)
    assert figures.error_rate == 0.25


def test_p99_is_the_nearest_rank_of_the_window() -> None:
    recent = RecentCalls(clock=FakeClock())
    for millis in range(1, 101):
        recent.record_call(_call(seconds=millis / 1000))

    assert recent.figures("order-service").p99_s == pytest.approx(0.099)


def test_p50_is_the_median_of_the_window() -> None:
    recent = RecentCalls(clock=FakeClock())
    for millis in (5, 1, 3, 2, 100):
        recent.record_call(_call(seconds=millis / 1000))

    assert recent.figures("order-service").p50_s == pytest.approx(0.003)


def test_calls_older_than_the_window_are_forgotten_but_not_the_last_error() -> None:
    clock = FakeClock()
    recent = RecentCalls(window_s=60.0, clock=clock, wall_clock=lambda: 1_700_000_000.0)
    recent.record_call(_call("UNAVAILABLE", error="connection refused"))
    clock.advance(61.0)
    recent.record_call(_call("OK"))

    figures = recent.figures("order-service")

    assert (figures.calls, figures.failures) == (1, 0)
    assert figures.last_error == "connection refused"
    assert figures.last_error_code == "UNAVAILABLE"
    assert figures.last_error_at == 1_700_000_000.0


def test_retries_per_second_cover_only_the_time_since_start() -> None:
    clock = FakeClock()
    recent = RecentCalls(window_s=60.0, clock=clock)
    clock.advance(10.0)

    recent.count("retries_total", {"target": "order-service", "method": METHOD}, 5)
    recent.count("attempts_total", {"target": "order-service", "method": METHOD}, 7)

    figures = recent.figures("order-service")
    assert figures.retries == 5
    assert figures.retries_per_s == 0.5


def test_a_target_never_called_has_empty_figures() -> None:
    figures = RecentCalls(clock=FakeClock()).figures("risk-service")

    assert (figures.calls, figures.error_rate, figures.p99_s, figures.last_error) == (0, 0, 0, "")


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 0.99) == 0.0


def test_the_last_error_carries_its_wall_clock_time() -> None:
    clock = FakeClock()
    wall = [1_700_000_000.0]
    recent = RecentCalls(clock=clock, wall_clock=lambda: wall[0])
    recent.record_call(_call("UNAVAILABLE", error="connection refused"))
    wall[0] += 30.0
    recent.record_call(_call("DEADLINE_EXCEEDED", error="deadline"))

    figures = recent.figures("order-service")

    assert (figures.last_error, figures.last_error_at) == ("deadline", 1_700_000_030.0)


def test_the_last_error_clears_after_three_answers_in_a_row() -> None:
    recent = RecentCalls(clock=FakeClock())
    recent.record_call(_call("UNAVAILABLE", error="connection refused"))
    recent.record_call(_call("OK"))
    recent.record_call(_call("NOT_FOUND"))  # an answer: the target is up
    assert recent.figures("order-service").last_error == "connection refused"

    recent.record_call(_call("OK"))

    figures = recent.figures("order-service")
    assert (figures.last_error, figures.last_error_code, figures.last_error_at) == ("", "", None)
    assert figures.failures == 1  # the window still counts the failure itself


def test_a_failure_between_answers_starts_the_recovery_count_again() -> None:
    recent = RecentCalls(clock=FakeClock(), recovery_calls=2)
    recent.record_call(_call("UNAVAILABLE", error="first"))
    recent.record_call(_call("OK"))
    recent.record_call(_call("UNAVAILABLE", error="second"))
    recent.record_call(_call("OK"))
    assert recent.figures("order-service").last_error == "second"

    recent.record_call(_call("OK"))

    assert recent.figures("order-service").last_error == ""


def test_calls_the_caller_cancelled_do_not_count_as_recovery() -> None:
    recent = RecentCalls(clock=FakeClock(), recovery_calls=1)
    recent.record_call(_call("UNAVAILABLE", error="connection refused"))

    recent.record_call(_call("CANCELLED"))

    assert recent.figures("order-service").last_error == "connection refused"


def test_recovery_needs_at_least_one_call() -> None:
    with pytest.raises(ValueError, match="recovery_calls"):
        RecentCalls(recovery_calls=0)
