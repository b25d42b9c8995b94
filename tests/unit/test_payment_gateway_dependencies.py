"""Which downstreams the gateway counts as down: open breakers with open time left, only."""

from __future__ import annotations

import pytest

from interceptors.breaker import BreakerRegistry, Outcome
from interceptors.policy import BreakerPolicy
from services.mesh.errors import Unavailable
from services.payment_gateway.dependencies import (
    CREATE_PAYMENT_NEEDS,
    DependencyWatch,
    DownTarget,
)
from tests.unit.fakes import FakeClock

POLICY = BreakerPolicy(minimum_calls=2, consecutive_failures=2, open_s=30.0, half_open_calls=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breakers(clock: FakeClock) -> BreakerRegistry:
    return BreakerRegistry(lambda target: POLICY, clock=clock)


def _trip(breakers: BreakerRegistry, target: str) -> None:
    breaker = breakers.get(target)
    for _ in range(2):
        breaker.record(breaker.admit(), Outcome.FAILURE)
    assert breakers.states()[target] == "open"


def test_closed_breakers_and_unknown_targets_are_not_down(breakers: BreakerRegistry) -> None:
    breakers.get("risk-service")
    watch = DependencyWatch(breakers)
    assert watch.down(CREATE_PAYMENT_NEEDS) is None
    watch.refuse_if_down(CREATE_PAYMENT_NEEDS, action="CreatePayment")  # no refusal
    assert set(breakers.states()) == {"risk-service"}  # reading made no breaker


def test_open_breaker_is_down_for_its_remaining_open_time(
    breakers: BreakerRegistry, clock: FakeClock
) -> None:
    _trip(breakers, "order-service")
    clock.advance(12.5)
    watch = DependencyWatch(breakers)
    assert watch.down(CREATE_PAYMENT_NEEDS) == DownTarget("order-service", 17.5)
    with pytest.raises(Unavailable) as refused:
        watch.refuse_if_down(CREATE_PAYMENT_NEEDS, action="CreatePayment")
    assert refused.value.reason == "CIRCUIT_OPEN"
    assert refused.value.retry_delay_s == pytest.approx(17.5)
    assert refused.value.metadata == {"target": "order-service"}


def test_breaker_whose_open_time_passed_is_not_down(
    breakers: BreakerRegistry, clock: FakeClock
) -> None:
    _trip(breakers, "order-service")
    clock.advance(30.0)
    assert breakers.states()["order-service"] == "half-open-ready"
    assert DependencyWatch(breakers).down(CREATE_PAYMENT_NEEDS) is None


def test_half_open_breaker_is_not_down(breakers: BreakerRegistry, clock: FakeClock) -> None:
    _trip(breakers, "order-service")
    clock.advance(30.0)
    breakers.get("order-service").admit()  # the trial call now in flight
    assert breakers.states()["order-service"] == "half-open"
    assert DependencyWatch(breakers).down(CREATE_PAYMENT_NEEDS) is None


def test_target_not_needed_is_never_down(breakers: BreakerRegistry) -> None:
    _trip(breakers, "notification-service")
    assert DependencyWatch(breakers).down(CREATE_PAYMENT_NEEDS) is None


def test_the_longest_open_of_several_down_targets_is_reported(
    breakers: BreakerRegistry, clock: FakeClock
) -> None:
    _trip(breakers, "risk-service")
    clock.advance(10)
    _trip(breakers, "channel-adapter")
    watch = DependencyWatch(breakers)
    assert watch.down(CREATE_PAYMENT_NEEDS) == DownTarget("channel-adapter", 30.0)
    assert watch.open_left_s("risk-service") == pytest.approx(20.0)
    assert watch.open_left_s("order-service") == 0.0
