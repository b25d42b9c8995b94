"""Retry decision of one call, transport-agnostic: may this failed attempt be repeated, when?

A ``RetryRun`` follows one call across its attempts, against one overall deadline: it says
retry (after how long) or stop (and why). Status codes are gRPC's names as strings, so the
HTTP wrapper maps its statuses onto the same rules; adapters classify what the code alone
cannot say (a TLS handshake failure, a deadline that was the caller's). No gRPC import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from interceptors import codes
from interceptors.backoff import Random, backoff_delay_s
from interceptors.breaker import Outcome
from interceptors.budget import RetryBudget
from interceptors.policy import RetryPolicy

Clock = Callable[[], float]
StopReason = Literal[
    "not_retryable",
    "attempts_exhausted",
    "deadline",
    "budget",
    "breaker_open",
    "pushback",
    "concurrency_limited",
]


def breaker_outcome(
    code: str, *, tls_failed: bool = False, deadline_was_callers: bool = False
) -> Outcome:
    """How an attempt's final code counts for the target's breaker.

    Ignored, neither success nor failure (like resilience4j's ignored exceptions: not in the
    rate window, and a half-open trial slot is given back), whatever says nothing about the
    target's health: a cancellation; a TLS handshake failure (a certificate problem, which
    no amount of waiting fixes); a DEADLINE_EXCEEDED while the caller's propagated deadline,
    shorter than the call's own timeout, bound the call (else anyone calling us could open
    our breakers by sending short deadlines). A DEADLINE_EXCEEDED within the call's own
    timeout is the target being slow, and counts.

    Args:
        code: Status code name of the attempt (``OK`` for a success).
        tls_failed: Whether the attempt failed in the TLS handshake.
        deadline_was_callers: Whether the incoming deadline, not the call's own, bound it.
    """
    if code == "CANCELLED" or tls_failed:
        return Outcome.IGNORED
    if code == "DEADLINE_EXCEEDED" and deadline_was_callers:
        return Outcome.IGNORED
    return Outcome.FAILURE if code in codes.TARGET_UNHEALTHY else Outcome.SUCCESS


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFailure:
    """What one failed attempt told us."""

    code: str
    """Status code name (``UNAVAILABLE``)."""
    pushback_ms: int | None = None
    """``grpc-retry-pushback-ms`` (or HTTP Retry-After); negative means do not retry."""
    retry_delay_s: float | None = None
    """google.rpc.RetryInfo's retry_delay, when the server sent one."""
    tls_problem: str | None = None
    """What the TLS handshake complained of, when the attempt failed in it; never retried."""
    detail: str = ""
    """What the attempt's error said, for the caller's error, the span and the call log."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Retry after ``delay_s``, or stop for ``stop_reason``."""

    retry: bool
    """Whether to send another attempt."""
    delay_s: float = 0.0
    """Sleep before it."""
    stop_reason: StopReason | None = None
    """Why not, when not."""


def _stop(reason: StopReason) -> Decision:
    return Decision(retry=False, stop_reason=reason)


class RetryRun:
    """One call's attempts against one overall deadline, one policy and its target's budget."""

    __slots__ = ("_budget", "_clock", "_rng", "attempts", "deadline_at", "policy", "safe")

    def __init__(
        self,
        *,
        policy: RetryPolicy,
        safe: bool,
        deadline_at: float,
        budget: RetryBudget,
        clock: Clock = time.monotonic,
        rng: Random,
        attempts: int = 0,
    ) -> None:
        self.policy = policy
        self.safe = safe
        self.deadline_at = deadline_at
        self._budget = budget
        self._clock = clock
        self._rng = rng
        self.attempts = attempts
        """Attempts started so far (``attempts``: those started before it was made)."""

    def start_attempt(self) -> float:
        """Count an attempt about to be sent; returns the seconds left of the deadline."""
        self.attempts += 1
        if self.attempts == 1:  # made before the first attempt: it counts that one
            self._budget.record_first_attempt()
        return self.deadline_at - self._clock()

    def after_failure(self, failure: AttemptFailure) -> Decision:
        """Whether and when to repeat the attempt that just failed."""
        code = failure.code
        if failure.tls_problem is not None:
            return _stop("not_retryable")  # a retry cannot fix a certificate
        if failure.pushback_ms is not None and failure.pushback_ms < 0:
            return _stop("pushback")
        if code in self.policy.retryable_codes:
            if code == "DEADLINE_EXCEEDED" and self._clock() >= self.deadline_at:
                return _stop("deadline")
        elif code in codes.PUSHBACK_ONLY:
            if failure.pushback_ms is None and failure.retry_delay_s is None:
                return _stop("not_retryable")
        else:
            return _stop("not_retryable")
        if not self.safe:
            return _stop("not_retryable")
        if self.attempts >= self.policy.max_attempts:
            return _stop("attempts_exhausted")
        server_delay = (
            failure.pushback_ms / 1000 if failure.pushback_ms is not None else failure.retry_delay_s
        )
        delay = backoff_delay_s(self.policy, self.attempts, self._rng, server_delay_s=server_delay)
        if self._clock() + delay >= self.deadline_at:
            return _stop("deadline")  # sleeping would end past the deadline: stop early
        if not self._budget.try_spend_retry():
            return _stop("budget")
        return Decision(retry=True, delay_s=delay)
