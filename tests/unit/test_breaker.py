"""Breaker per target with a fake clock: failure rate, minimum calls, open, half-open."""

from __future__ import annotations

import pytest

from interceptors.breaker import BreakerOpen, BreakerRegistry, Outcome, TargetBreaker
from interceptors.policy import BreakerPolicy
from tests.unit.fakes import FakeClock

F, S = Outcome.FAILURE, Outcome.SUCCESS


def breaker(clock: FakeClock, transitions: list[tuple[str, str]] | None = None) -> TargetBreaker:
    def hook(_: str, old: str, new: str) -> None:
        if transitions is not None:
            transitions.append((old, new))

    return TargetBreaker("order-service", BreakerPolicy(), clock=clock, on_transition=hook)


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
    b = breaker(clock)
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
