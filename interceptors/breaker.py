"""One circuit breaker per target: trips on the failure rate of a sliding window.

pybreaker holds each breaker's state machine and fires its listeners (metrics, logs); the
admission and counting rules are ours, because pybreaker counts consecutive failures on the
wall clock, lets any number of calls through when half-open and holds its lock for the whole
call in ``call()``. Here a lock is held only to admit and to record, never across a call, so
concurrent calls stay concurrent, and half-open admits exactly ``half_open_calls``.
No gRPC import.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pybreaker

from interceptors.policy import BreakerPolicy

log = logging.getLogger("paymesh.chain")

Clock = Callable[[], float]
#: Called on every transition with (target, old state, new state).
TransitionHook = Callable[[str, str, str], None]

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class Outcome(enum.Enum):
    """What a finished call says about the target's health."""

    SUCCESS = "success"
    """The target answered (business errors included)."""
    FAILURE = "failure"
    """The target looks unhealthy (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...)."""
    IGNORED = "ignored"
    """Says nothing about the target (the caller cancelled, its own deadline ran out, the TLS
    handshake failed): left out of the rate window; a half-open trial gives its slot back."""


class BreakerOpen(Exception):
    """The target's breaker rejected the call locally; nothing was sent."""

    def __init__(self, target: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker of {target} is open; retry in {retry_after_s:.1f} s")
        self.target = target
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True, kw_only=True)
class Permit:
    """Admission of one call; hand it back to ``record`` with the outcome."""

    generation: int
    """State generation it was issued in; outcomes of older generations are ignored."""
    trial: bool
    """Whether it is one of the half-open trial calls."""


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, hook: TransitionHook | None) -> None:
        self._hook = hook

    def state_change(self, cb: pybreaker.CircuitBreaker, old: object, new: object) -> None:
        old_name = getattr(old, "name", CLOSED)
        new_name = getattr(new, "name", CLOSED)
        log.warning("circuit breaker of %s: %s -> %s", cb.name, old_name, new_name)
        if self._hook is not None:
            self._hook(str(cb.name), str(old_name), str(new_name))


class TargetBreaker:
    """The breaker of one target service or partner."""

    def __init__(
        self,
        target: str,
        policy: BreakerPolicy,
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionHook | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._cb = pybreaker.CircuitBreaker(
            reset_timeout=policy.open_s, name=target, listeners=[_Listener(on_transition)]
        )
        self._window: deque[tuple[float, bool]] = deque()
        self._generation = 0
        self._opened_at = 0.0
        self._trials_issued = 0
        self._trials_passed = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (pybreaker's names)."""
        return str(self._cb.current_state)

    def admit(self) -> Permit:
        """Let one call through, or raise BreakerOpen without touching the network."""
        with self._lock:
            state = self.state
            if state == OPEN:
                waited = self._clock() - self._opened_at
                if waited < self.policy.open_s:
                    raise BreakerOpen(self.target, self.policy.open_s - waited)
                self._transition(HALF_OPEN)
                state = HALF_OPEN
            if state == HALF_OPEN:
                if self._trials_issued >= self.policy.half_open_calls:
                    raise BreakerOpen(self.target, 0.0)
                self._trials_issued += 1
                return Permit(generation=self._generation, trial=True)
            return Permit(generation=self._generation, trial=False)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """Account the outcome of an admitted call; may trip, close or reopen the breaker."""
        with self._lock:
            if permit.generation != self._generation:
                return  # admitted before the last transition: says nothing about now
            if permit.trial:
                self._record_trial(outcome)
                return
            if outcome is Outcome.IGNORED:
                return
            now = self._clock()
            self._window.append((now, outcome is Outcome.FAILURE))
            horizon = now - self.policy.window_s
            while self._window and self._window[0][0] <= horizon:
                self._window.popleft()
            if outcome is not Outcome.FAILURE:
                return  # only a failure can tip the rate over the threshold
            failures = sum(1 for _, failed in self._window if failed)
            calls = len(self._window)
            if calls >= self.policy.minimum_calls and failures >= self.policy.failure_rate * calls:
                self._transition(OPEN)

    def _record_trial(self, outcome: Outcome) -> None:
        if outcome is Outcome.IGNORED:
            self._trials_issued -= 1  # give the slot to another trial
        elif outcome is Outcome.FAILURE:
            self._transition(OPEN)
        else:
            self._trials_passed += 1
            if self._trials_passed >= self.policy.half_open_calls:
                self._transition(CLOSED)

    def _transition(self, state: str) -> None:
        self._generation += 1
        self._window.clear()
        self._trials_issued = self._trials_passed = 0
        if state == OPEN:
            self._opened_at = self._clock()
            self._cb.open()
        elif state == HALF_OPEN:
            self._cb.half_open()
        else:
            self._cb.close()


class BreakerRegistry:
    """The breakers of one process, one per target, made on first use."""

    def __init__(
        self,
        policy_of: Callable[[str], BreakerPolicy],
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionHook | None = None,
    ) -> None:
        self._policy_of = policy_of
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._breakers: dict[str, TargetBreaker] = {}

    def get(self, target: str) -> TargetBreaker:
        """The breaker of ``target``."""
        breaker = self._breakers.get(target)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(
                    target,
                    TargetBreaker(
                        target,
                        self._policy_of(target),
                        clock=self._clock,
                        on_transition=self._on_transition,
                    ),
                )
        return breaker

    def states(self) -> dict[str, str]:
        """State of every breaker made so far, by target."""
        return {target: b.state for target, b in sorted(self._breakers.items())}
