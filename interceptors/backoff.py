"""Backoff schedule of retries: exponential with full jitter, or what the server asked for.

Full jitter (a uniform draw between zero and the exponential bound) spreads the retries of
many clients that failed together, so they do not come back in one wave. No gRPC import.
"""

from __future__ import annotations

from collections.abc import Callable

from interceptors.policy import RetryPolicy

Random = Callable[[], float]


def backoff_bound_s(policy: RetryPolicy, retry_number: int) -> float:
    """Upper bound of the sleep before retry ``retry_number`` (1 = the first retry)."""
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    bound = policy.initial_backoff_s * policy.backoff_multiplier ** (retry_number - 1)
    return min(policy.max_backoff_s, bound)


def backoff_delay_s(
    policy: RetryPolicy,
    retry_number: int,
    rng: Random,
    *,
    server_delay_s: float | None = None,
) -> float:
    """Sleep before retry ``retry_number``: the server's pushback if it sent one, else jittered."""
    if server_delay_s is not None:
        return max(0.0, server_delay_s)
    return rng() * backoff_bound_s(policy, retry_number)
