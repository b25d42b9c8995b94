"""When a webhook that failed is attempted again, and when delivery is given up (dead-lettered).

Exponential backoff with jitter over a long horizon, as payment providers retry webhooks for
days: the n-th failure of a round waits ``initial * multiplier**(n-1)`` capped at ``max``,
less a random share of up to ``jitter`` of it (so endpoints that failed together are not all
retried at once, while the pace never falls below half the bound); the last attempt of a
round is at its horizon, after which the notification is dead-lettered. No I/O, no gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: A uniform draw in [0, 1), like ``random.random``.
Random = Callable[[], float]

DEFAULT_INITIAL_BACKOFF_S = 10.0
DEFAULT_MAX_BACKOFF_S = 3600.0
#: Three days, like the providers merchants know (Stripe retries live webhooks for 3 days).
DEFAULT_HORIZON_S = 3 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverySchedule:
    """The retry schedule of one round of delivery attempts."""

    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    """Bound of the wait after a round's first failure."""
    backoff_multiplier: float = 2.0
    """Growth of the bound per further failure."""
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    """Cap of the bound, however many failures."""
    horizon_s: float = DEFAULT_HORIZON_S
    """Length of a round from its start (the notification's creation, or a redelivery);
    the last attempt is at its end, then the notification is dead-lettered."""
    jitter: float = 0.5
    """Largest share of a bound taken off at random (0 = no jitter, 1 = full jitter)."""

    def __post_init__(self) -> None:
        for name in ("initial_backoff_s", "max_backoff_s", "horizon_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be at least "
                f"initial_backoff_s ({self.initial_backoff_s})"
            )
        if not (math.isfinite(self.backoff_multiplier) and self.backoff_multiplier >= 1):
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def bound_s(self, failures: int) -> float:
        """The longest wait after a round's ``failures``-th failure (1 = the first)."""
        if failures < 1:
            raise ValueError(f"failures starts at 1, got {failures}")
        if self.backoff_multiplier == 1:
            return self.initial_backoff_s
        # The exponent is capped where the bound passes the cap: a large power would overflow.
        ratio = self.max_backoff_s / self.initial_backoff_s
        exponent = min(failures - 1, 1 + math.log(ratio) / math.log(self.backoff_multiplier))
        bound = self.initial_backoff_s * float(self.backoff_multiplier**exponent)
        return min(self.max_backoff_s, bound)

    def delay_s(self, failures: int, rng: Random) -> float:
        """The jittered wait after a round's ``failures``-th failure."""
        return self.bound_s(failures) * (1 - self.jitter * rng())

    def next_attempt_time(
        self, *, now: float, round_start: float, failures: int, rng: Random
    ) -> float | None:
        """When to attempt again after a failure at ``now``; None once the round is over.

        Args:
            now: the time of the failure.
            round_start: when the round began.
            failures: the round's failures so far, this one included.
            rng: the jitter's randomness.
        """
        end = round_start + self.horizon_s
        if now >= end:
            return None
        return min(now + self.delay_s(failures, rng), end)
