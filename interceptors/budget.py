"""Retry budget per target: retries may add only a share of recent first attempts.

Like Finagle's RetryBudget and Envoy's retry budgets: within a sliding window, retries are
allowed up to ``retry_ratio`` x first attempts plus a small floor, so during a full outage a
target receives about 1.2 x the calls, not 4 x. Exhaustion is counted every time and logged
once per window. No gRPC import.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from interceptors.policy import BudgetPolicy

log = logging.getLogger("paymesh.chain")

Clock = Callable[[], float]


class RetryBudget:
    """The budget of one target; thread-safe (the sync adapter calls it from threads)."""

    def __init__(self, target: str, policy: BudgetPolicy, *, clock: Clock = time.monotonic) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._firsts: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._last_logged: float | None = None
        self.exhausted_count = 0
        """How many retries the budget refused since start."""

    def _prune(self, now: float) -> None:
        horizon = now - self.policy.window_s
        for stamps in (self._firsts, self._retries):
            while stamps and stamps[0] <= horizon:
                stamps.popleft()

    def record_first_attempt(self) -> None:
        """Count one call's first attempt; it earns ``retry_ratio`` of a retry."""
        with self._lock:
            now = self._clock()
            firsts = self._firsts
            # Retries are pruned whenever they are read: only expired firsts need it here.
            if firsts and firsts[0] <= now - self.policy.window_s:
                self._prune(now)
            firsts.append(now)

    def try_spend_retry(self) -> bool:
        """Take one retry from the budget; False (counted, logged once a window) when empty."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            allowed = self.policy.retry_ratio * len(self._firsts) + self.policy.min_retries
            if len(self._retries) + 1 <= allowed:
                self._retries.append(now)
                return True
            self.exhausted_count += 1
            should_log = (
                self._last_logged is None or now - self._last_logged >= self.policy.window_s
            )
            if should_log:
                self._last_logged = now
        if should_log:
            log.warning(
                "retry budget of %s exhausted: %d retries for %d calls in the last %.0f s",
                self.target,
                len(self._retries),
                len(self._firsts),
                self.policy.window_s,
            )
        return False

    def snapshot(self) -> dict[str, float]:
        """First attempts, retries and refusals of the current window (for diagnostics)."""
        with self._lock:
            self._prune(self._clock())
            return {
                "first_attempts": len(self._firsts),
                "retries": len(self._retries),
                "exhausted_total": self.exhausted_count,
            }
