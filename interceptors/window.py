"""The breaker's failure-rate window: calls and failures of the last ``window_s`` seconds,
counted in a fixed ring of time buckets (resilience4j's time-based sliding window), so
recording a call and reading the totals cost the same however many calls the window holds.
No gRPC import.
"""

from __future__ import annotations

import math


class FailureWindow:
    """Calls and failures of a sliding time window, kept per bucket of ``window_s / buckets``.

    A call recorded at ``t`` counts until the bucket after ``t + window_s``'s has begun: for
    more than ``window_s`` and at most ``window_s + bucket_s``. So against an exact sliding
    window (a call counts while ``now - t < window_s``) the totals differ only by calls
    recorded within one bucket width before the exact window's edge, ``now - window_s``.
    """

    __slots__ = (
        "_calls",
        "_failures",
        "_newest",
        "_next_at",
        "_slot",
        "_slots",
        "bucket_s",
        "buckets_cleared",
        "calls",
        "failures",
    )

    def __init__(self, window_s: float, buckets: int) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError(f"need window_s > 0 and buckets >= 1, got {window_s!r}, {buckets!r}")
        self.bucket_s = window_s / buckets
        """Width of one bucket, in seconds."""
        # The bucket now filling plus ``buckets`` whole ones behind it: never shorter than window_s.
        self._slots = buckets + 1
        self._calls = [0] * self._slots
        self._failures = [0] * self._slots
        self._newest: int | None = None  # absolute number of the bucket now filling
        self._slot = 0  # its slot
        #: Every time before this one is in the bucket now filling (-inf: none is).
        self._next_at = -math.inf
        self.calls = 0
        """Calls in the window, as of the last ``record`` or ``advance``."""
        self.failures = 0
        """Of which failed."""
        self.buckets_cleared = 0
        """Buckets emptied as time moved on, ever: the work the window did beyond counting."""

    def record(self, now: float, *, failed: bool) -> None:
        """Count one finished call at ``now``."""
        slot = self.advance(now)
        self._calls[slot] += 1
        self.calls += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1

    def record_success(self, now: float) -> None:
        """``record(now, failed=False)``: a call that succeeded, counted and the window moved
        in one step (one comparison while the bucket now filling is still ``now``'s)."""
        slot = self._slot if now < self._next_at else self.advance(now)
        self._calls[slot] += 1
        self.calls += 1

    def advance(self, now: float) -> int:
        """Move the window to ``now``, dropping the buckets it left; the slot ``now`` fills."""
        if now < self._next_at:
            return self._slot  # the bucket now filling is ``now``'s (or a later one's)
        number = math.floor(now / self.bucket_s)
        newest = self._newest
        if newest is None:
            self._moved_to(number)
            return self._slot
        if number <= newest:
            return newest % self._slots  # same bucket (a clock read late counts as now)
        # At most one lap: after an idle window every bucket is emptied once, no more.
        for passed in range(newest + 1, min(number, newest + self._slots) + 1):
            slot = passed % self._slots
            self.calls -= self._calls[slot]
            self.failures -= self._failures[slot]
            self._calls[slot] = self._failures[slot] = 0
            self.buckets_cleared += 1
        self._moved_to(number)
        return self._slot

    def _moved_to(self, number: int) -> None:
        self._newest = number
        self._slot = number % self._slots
        # The first time past bucket ``number``, nudged down until the division agrees.
        bucket_s = self.bucket_s
        next_at = (number + 1) * bucket_s
        while math.floor(next_at / bucket_s) > number:
            next_at = math.nextafter(next_at, -math.inf)
        self._next_at = next_at

    def clear(self) -> None:
        """Forget every call (on a transition: a new state starts counting afresh)."""
        self._calls = [0] * self._slots
        self._failures = [0] * self._slots
        self._newest = None
        self._next_at = -math.inf
        self.calls = self.failures = 0
