"""Breaker per target with a fake clock: failure rate, consecutive failures, slow calls,
calls in flight, open, half-open, and what its readout says."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

from interceptors.breaker import (
    HALF_OPEN_READY,
    BreakerOpen,
    BreakerRegistry,
    ConcurrencyLimited,
    Outcome,
    Permit,
    TargetBreaker,
)
from interceptors.policy import BreakerPolicy
from tests.unit.fakes import FakeClock

F, S, IGN = Outcome.FAILURE, Outcome.SUCCESS, Outcome.IGNORED
SLOW_S = BreakerPolicy().slow_call_duration_s


def breaker(
    clock: FakeClock,
    transitions: list[tuple[str, str]] | None = None,
    trips: list[str] | None = None,
    **policy: Any,
) -> TargetBreaker:
    def hook(_: str, old: str, new: str) -> None:
        if transitions is not None:
            transitions.append((old, new))

    def tripped(_: str, rule: str) -> None:
        if trips is not None:
            trips.append(rule)

    return TargetBreaker(
        "order-service",
        dataclasses.replace(BreakerPolicy(), **policy),
        clock=clock,
        on_transition=hook,
        on_trip=tripped,
    )


def run(b: TargetBreaker, *outcomes: Outcome) -> None:
    for outcome in outcomes:
        b.record(b.admit(), outcome)


def trip(b: TargetBreaker) -> None:
    run(b, F, F, F, F, F)


def test_trips_at_sixty_percent_of_at_least_five_calls() -> None:
    b = breaker(FakeClock())
    run(b, S, S, F, F, F)
    assert b.state == "open"


def test_stays_closed_below_the_minimum_number_of_calls() -> None:
    b = breaker(FakeClock())
    run(b, F, F, F, F)
    assert b.state == "closed"


def test_stays_closed_below_the_failure_rate() -> None:
    b = breaker(FakeClock())
    run(b, S, S, S, F, F)
    assert b.state == "closed"


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100)  # the window's rule alone
    run(b, F, F, F, F)
    clock.advance(61)
    run(b, F)
    assert b.state == "closed"


def test_open_breaker_rejects_without_admitting() -> None:
    b = breaker(FakeClock())
    trip(b)
    with pytest.raises(BreakerOpen) as caught:
        b.admit()
    assert caught.value.target == "order-service"


def test_half_open_after_the_open_period_admits_exactly_three() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(30)
    permits = [b.admit() for _ in range(3)]
    assert b.state == "half-open"
    with pytest.raises(BreakerOpen):
        b.admit()
    assert all(p.trial for p in permits)


def test_half_open_closes_when_all_trials_succeed() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(30)
    permits = [b.admit() for _ in range(3)]
    for permit in permits:
        b.record(permit, S)
    assert b.state == "closed"


def test_half_open_reopens_on_a_trial_failure() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(30)
    b.record(b.admit(), F)
    assert b.state == "open"
    with pytest.raises(BreakerOpen):
        b.admit()


def test_cancelled_trial_frees_its_slot() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(30)
    permits = [b.admit() for _ in range(3)]
    b.record(permits[0], Outcome.IGNORED)
    b.admit()  # the freed slot
    with pytest.raises(BreakerOpen):
        b.admit()


def test_cancellations_do_not_count_as_failures() -> None:
    b = breaker(FakeClock())
    run(b, *[Outcome.IGNORED] * 10)
    assert b.state == "closed"


def test_outcomes_of_calls_admitted_before_a_transition_are_ignored() -> None:
    clock = FakeClock()
    b = breaker(clock)
    stale = b.admit()
    trip(b)
    clock.advance(30)
    trials = [b.admit() for _ in range(3)]
    b.record(stale, F)  # admitted while closed: says nothing about now
    for permit in trials:
        b.record(permit, S)
    assert b.state == "closed"


def test_transitions_are_reported_through_pybreaker_listeners() -> None:
    clock = FakeClock()
    seen: list[tuple[str, str]] = []
    b = breaker(clock, seen)
    trip(b)
    clock.advance(30)
    for permit in [b.admit() for _ in range(3)]:
        b.record(permit, S)
    assert seen == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_registry_keeps_one_breaker_per_target() -> None:
    registry = BreakerRegistry(lambda _: BreakerPolicy(), clock=FakeClock())
    assert registry.get("a") is registry.get("a")
    assert registry.get("a") is not registry.get("b")
    assert registry.states() == {"a": "closed", "b": "closed"}


def test_ignored_outcomes_neither_dilute_nor_add_to_the_failure_rate() -> None:
    b = breaker(FakeClock())
    run(b, F, F, F, *[Outcome.IGNORED] * 20, S)
    assert b.state == "closed"  # 3 failures in 4 counted calls: under the minimum of 5
    run(b, S)
    assert b.state == "closed"
    run(b, F)
    assert b.state == "open"  # 4 of 6 counted calls failed; the 20 ignored never counted


# --- consecutive failures ---------------------------------------------------------------


def test_five_failures_in_a_row_open_it_whatever_successes_the_window_holds() -> None:
    trips: list[str] = []
    b = breaker(FakeClock(), trips=trips)
    run(b, *[S] * 40, F, F, F, F)
    assert b.state == "closed"  # 4 of 44 failed: far under the failure rate
    run(b, F)
    assert b.state == "open"
    assert trips == ["consecutive_failures"]


def test_a_success_breaks_the_run_of_failures() -> None:
    b = breaker(FakeClock())
    run(b, *[S] * 40, F, F, F, F, S, F, F, F, F)
    assert b.state == "closed"


def test_ignored_outcomes_neither_break_nor_extend_the_run() -> None:
    b = breaker(FakeClock())
    run(b, *[S] * 40, F, F, IGN, IGN, IGN, F, F)
    assert b.state == "closed"
    run(b, F)
    assert b.state == "open"


# --- slow calls -----------------------------------------------------------------------------


def slow(b: TargetBreaker, clock: FakeClock, outcome: Outcome = S) -> None:
    """One call that takes exactly the slow-call duration, then ends with ``outcome``."""
    permit = b.admit()
    clock.advance(SLOW_S)
    b.record(permit, outcome)


def test_three_slow_successes_of_the_last_five_calls_open_it() -> None:
    clock = FakeClock()
    trips: list[str] = []
    b = breaker(clock, trips=trips)
    run(b, *[S] * 40)
    slow(b, clock)
    slow(b, clock)
    assert b.state == "closed"
    slow(b, clock)
    assert b.state == "open"
    assert trips == ["slow_call_rate"]


def test_a_call_just_under_the_slow_duration_is_fast() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(10):
        permit = b.admit()
        clock.advance(SLOW_S - 0.01)
        b.record(permit, S)
    assert b.state == "closed"
    assert b.readout().slow_calls == 0


def test_fast_calls_between_slow_ones_keep_the_rate_under_the_threshold() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(10):
        slow(b, clock)
        run(b, S, S)  # 2 slow of any 5 in a row at most
    assert b.state == "closed"


def test_a_new_breaker_does_not_open_on_its_first_slow_calls() -> None:
    clock = FakeClock()
    b = breaker(clock)
    slow(b, clock)
    slow(b, clock)
    assert b.state == "closed"  # 2 of 2 calls, but a window of 5 needs 3
    slow(b, clock)
    assert b.state == "open"


def test_slow_failures_count_as_slow_and_as_failures() -> None:
    clock = FakeClock()
    trips: list[str] = []
    b = breaker(clock, trips=trips)
    run(b, *[S] * 40)
    for _ in range(3):
        slow(b, clock, F)
    assert b.state == "open"
    assert trips == ["slow_call_rate"]  # three slow ones come before five failures


def test_a_cancelled_call_that_was_slow_counts_as_slow() -> None:
    clock = FakeClock()
    b = breaker(clock)
    run(b, *[S] * 40)
    for _ in range(3):
        slow(b, clock, IGN)
    assert b.state == "open"


def test_calls_in_flight_count_as_slow_before_they_end() -> None:
    clock = FakeClock()
    b = breaker(clock)
    run(b, *[S] * 40)
    admitted: list[Permit] = []
    with pytest.raises(BreakerOpen):  # a hung target: calls at 4/s, none ever answers
        while True:
            admitted.append(b.admit())
            clock.advance(0.25)
    # The third call in flight for 2.5 s opens it at 3.0 s: 12 calls were admitted, far fewer
    # than the 20 a 5 s deadline would have let in before the first failure.
    assert len(admitted) == 12
    assert b.state == "open"


def test_opening_fails_every_call_in_flight_once() -> None:
    clock = FakeClock()
    b = breaker(clock)
    aborted: list[int] = []
    held = [b.admit(functools.partial(aborted.append, n)) for n in range(3)]
    run(b, F, F, F, F, F)
    assert aborted == [0, 1, 2]
    for permit in held:
        b.record(permit, IGN)  # what the aborted calls report: nothing about the new state
    clock.advance(30)
    run(b, F)
    assert aborted == [0, 1, 2]
    assert b.state == "open"


def test_calls_admitted_before_it_opened_are_not_noticed_slow_later() -> None:
    clock = FakeClock()
    b = breaker(clock, open_s=0.0)
    held = [b.admit() for _ in range(3)]  # a sync call cannot be failed: it stays in flight
    run(b, F, F, F, F, F)
    for permit in [b.admit() for _ in range(3)]:
        b.record(permit, S)
    assert b.state == "closed"
    clock.advance(SLOW_S * 4)
    run(b, S)
    assert b.state == "closed"
    assert b.readout().in_flight == len(held)


# --- half-open trials ---------------------------------------------------------------------


def test_a_slow_trial_reopens_it_even_if_it_succeeds() -> None:
    clock = FakeClock()
    trips: list[str] = []
    b = breaker(clock, trips=trips)
    trip(b)
    clock.advance(30)
    slow(b, clock)
    assert b.state == "open"
    assert trips == ["consecutive_failures", "trial_slow"]


def test_a_trial_still_in_flight_too_long_reopens_it_at_the_next_call() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(30)
    aborted: list[bool] = []
    b.admit(lambda: aborted.append(True))
    clock.advance(SLOW_S)
    with pytest.raises(BreakerOpen) as caught:
        b.admit()
    assert caught.value.retry_after_s == 30.0
    assert aborted == [True]


# --- calls in flight ------------------------------------------------------------------------


def test_calls_beyond_the_limit_in_flight_are_refused_at_once() -> None:
    b = breaker(FakeClock(), max_concurrent_calls=3)
    held = [b.admit() for _ in range(3)]
    with pytest.raises(ConcurrencyLimited) as caught:
        b.admit()
    assert (caught.value.limit, caught.value.retry_after_s) == (3, SLOW_S)
    b.record(held[0], S)
    b.admit()  # the slot it freed


def test_refused_calls_are_not_breaker_failures() -> None:
    b = breaker(FakeClock(), max_concurrent_calls=3)
    for _ in range(3):
        b.admit()
    for _ in range(100):
        with pytest.raises(ConcurrencyLimited):
            b.admit()
    reading = b.readout()
    assert (reading.state, reading.window_calls, reading.consecutive_failures) == ("closed", 0, 0)


def test_the_limit_holds_while_half_open() -> None:
    clock = FakeClock()
    b = breaker(clock, max_concurrent_calls=1)
    trip(b)
    clock.advance(30)
    b.admit()
    with pytest.raises(ConcurrencyLimited):  # a trial slot is free, the limit is not
        b.admit()
    assert (b.state, b.readout().in_flight) == ("half-open", 1)


def test_the_default_limit_is_100() -> None:
    b = breaker(FakeClock())
    for _ in range(100):
        b.admit()
    with pytest.raises(ConcurrencyLimited):
        b.admit()


# --- readout --------------------------------------------------------------------------------


def test_open_breaker_reads_open_with_its_time_left() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(29)
    reading = b.readout()
    assert (reading.state, reading.open_left_s) == ("open", 1.0)
    assert reading.last_trip == "consecutive_failures: 5 failures in a row"


def test_open_breaker_reads_half_open_ready_once_its_open_time_passed() -> None:
    clock = FakeClock()
    registry = BreakerRegistry(lambda _: BreakerPolicy(), clock=clock)
    trip(registry.get("order-service"))
    clock.advance(30)
    assert registry.states() == {"order-service": HALF_OPEN_READY}
    assert registry.readouts()["order-service"].open_left_s == 0.0
    clock.advance(600)  # minutes later, with no call meanwhile: still ready, not "retry in"
    assert registry.states() == {"order-service": "half-open-ready"}
    registry.get("order-service").admit()
    assert registry.states() == {"order-service": "half-open"}


def test_readout_shows_calls_in_flight_and_how_long_the_oldest_waits() -> None:
    clock = FakeClock()
    b = breaker(clock)
    b.admit()
    clock.advance(1.5)
    b.admit()
    reading = b.readout()
    assert (reading.in_flight, reading.oldest_in_flight_s, reading.max_concurrent_calls) == (
        2,
        1.5,
        100,
    )


def test_readout_counts_the_window_as_it_moves() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100)
    run(b, S, F, F)
    clock.advance(61)
    run(b, S, F)
    reading = b.readout()
    assert (reading.window_calls, reading.window_failures, reading.consecutive_failures) == (
        2,
        1,
        1,
    )
