"""Backoff: exponential bound, capped, full jitter, server delay first."""

from __future__ import annotations

import pytest

from interceptors.backoff import backoff_bound_s, backoff_delay_s
from interceptors.policy import RetryPolicy

POLICY = RetryPolicy()


@pytest.mark.parametrize(("retry", "bound"), [(1, 0.05), (2, 0.1), (3, 0.2), (5, 0.8), (6, 1.0)])
def test_bound_doubles_from_initial_up_to_the_cap(retry: int, bound: float) -> None:
    assert backoff_bound_s(POLICY, retry) == pytest.approx(bound)


def test_full_jitter_draws_between_zero_and_the_bound() -> None:
    assert backoff_delay_s(POLICY, 3, lambda: 0.0) == 0.0
    assert backoff_delay_s(POLICY, 3, lambda: 0.5) == pytest.approx(0.1)


def test_server_delay_replaces_the_jitter() -> None:
    assert backoff_delay_s(POLICY, 1, lambda: 0.9, server_delay_s=0.7) == 0.7
