"""Retry budget: ratio of recent first attempts plus a floor, over a sliding window."""

from __future__ import annotations

import logging

import pytest

from interceptors.budget import RetryBudget
from interceptors.policy import BudgetPolicy
from tests.unit.fakes import FakeClock


def spend(budget: RetryBudget, retries: int) -> int:
    return sum(budget.try_spend_retry() for _ in range(retries))


def test_quiet_client_may_still_retry_up_to_the_floor() -> None:
    budget = RetryBudget("t", BudgetPolicy(min_retries=3), clock=FakeClock())
    assert spend(budget, 10) == 3


def test_retries_add_at_most_the_ratio_of_first_attempts() -> None:
    budget = RetryBudget("t", BudgetPolicy(retry_ratio=0.2, min_retries=0), clock=FakeClock())
    for _ in range(100):
        budget.record_first_attempt()
    assert spend(budget, 100) == 20


def test_outage_attempts_stay_within_ratio_plus_floor() -> None:
    budget = RetryBudget("t", BudgetPolicy(retry_ratio=0.2, min_retries=5), clock=FakeClock())
    sent = 0
    for _ in range(200):  # 200 calls, each wanting 3 retries
        budget.record_first_attempt()
        sent += 1 + spend(budget, 3)
    assert sent <= 1.2 * 200 + 5


def test_window_expiry_refills_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget("t", BudgetPolicy(min_retries=1, window_s=10), clock=clock)
    assert spend(budget, 2) == 1
    clock.advance(10.1)
    assert spend(budget, 1) == 1


def test_exhaustion_is_counted_every_time_and_logged_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    budget = RetryBudget("t", BudgetPolicy(min_retries=0, window_s=10), clock=clock)
    with caplog.at_level(logging.WARNING, logger="paymesh.chain"):
        spend(budget, 5)
        clock.advance(11)
        spend(budget, 5)
    assert budget.exhausted_count == 10
    assert len([r for r in caplog.records if "retry budget" in r.message]) == 2
