"""One circuit breaker per target: trips on failures or slow calls, caps the calls in flight.

Three rules open it, whichever comes first: the failure rate of a sliding time window
(counted in time buckets, so a call costs the same however many the window holds), a run of
consecutive failures, and the slow-call rate of the last calls (resilience4j), where a call
still in flight counts as slow as soon as it has run too long, so a hung target is noticed
before any deadline expires. Opening fails the calls still in flight at once, as
closing a dead connection would. Beyond ``max_concurrent_calls`` in flight a call is refused
(Envoy's ``max_requests``). pybreaker holds the state machine and fires its listeners; a
lock is held only to admit and to record, never across a call. No gRPC import.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pybreaker

from interceptors.policy import BreakerPolicy
from interceptors.window import FailureWindow

log = logging.getLogger("paymesh.chain")

Clock = Callable[[], float]
#: Called on every transition with (target, old state, new state).
TransitionHook = Callable[[str, str, str], None]
#: Called when a rule opens the breaker, with (target, rule): one of ``TRIP_RULES``.
TripHook = Callable[[str, str], None]
#: Fails one call in flight at once; called (outside the breaker's lock) when it opens.
AbortHook = Callable[[], None]

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
#: What the readout says of an OPEN breaker whose open time has passed: the next call is a
#: half-open trial. pybreaker stays OPEN until that call, since only a call moves it.
HALF_OPEN_READY = "half-open-ready"
#: The rules that open a breaker, as ``TripHook`` and the readout name them.
TRIP_RULES = (
    "failure_rate",
    "consecutive_failures",
    "slow_call_rate",
    "trial_failed",
    "trial_slow",
)


class Outcome(enum.Enum):
    """What a finished call says about the target's health."""

    SUCCESS = "success"
    """The target answered (business errors included)."""
    FAILURE = "failure"
    """The target looks unhealthy (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...)."""
    IGNORED = "ignored"
    """Says nothing about the target (the caller cancelled, its own deadline ran out, the TLS
    handshake failed): left out of the rate window and the failure run; a half-open trial
    gives its slot back. Its duration still counts: a slow call was slow."""


class CallRefused(Exception):
    """The chain refused the call locally; nothing was sent."""

    def __init__(self, target: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.target = target
        self.retry_after_s = retry_after_s


class BreakerOpen(CallRefused):
    """The target's breaker is open (or its trial calls are all out)."""

    def __init__(self, target: str, retry_after_s: float) -> None:
        super().__init__(
            target,
            retry_after_s,
            f"circuit breaker of {target} is open; retry in {retry_after_s:.1f} s",
        )


class ConcurrencyLimited(CallRefused):
    """``limit`` attempts to the target are in flight already."""

    def __init__(self, target: str, retry_after_s: float, limit: int) -> None:
        super().__init__(
            target,
            retry_after_s,
            f"{limit} calls to {target} are in flight already (its limit); "
            f"retry in {retry_after_s:.1f} s",
        )
        self.limit = limit


class Permit:
    """Admission of one call; hand it back to ``record`` with the outcome. While the call is
    in flight it is also the breaker's entry for it (slow-call noticing, abort on opening)."""

    __slots__ = ("abort", "generation", "number", "slow", "started_at", "trial")

    def __init__(
        self, number: int, generation: int, trial: bool, started_at: float, abort: AbortHook | None
    ) -> None:
        self.number = number
        """Its place among the breaker's admissions (the key of its entry in flight)."""
        self.generation = generation
        """State generation it was issued in; outcomes of older generations are ignored."""
        self.trial = trial
        """Whether it is one of the half-open trial calls."""
        self.started_at = started_at
        """When it was admitted, on the breaker's clock."""
        self.abort = abort
        """Fails the call if the breaker opens while it is in flight; None once used."""
        self.slow = False
        """Whether it was seen in flight past the slow-call duration."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerReadout:
    """What an operator sees of one breaker (``/breakers``, Diagnostics, metrics)."""

    state: str
    """``closed``, ``open``, ``half-open``, or ``half-open-ready`` once the open time passed."""
    open_left_s: float
    """Seconds until it admits trial calls; 0 unless ``open``."""
    in_flight: int
    """Attempts to the target now in flight."""
    max_concurrent_calls: int
    """The limit of ``in_flight``."""
    oldest_in_flight_s: float
    """How long the oldest of them has been waiting; 0 with none."""
    consecutive_failures: int
    """Failures in a row, while closed."""
    window_calls: int
    """Calls in the failure-rate window."""
    window_failures: int
    """Of which failed."""
    slow_calls: int
    """Slow calls among the last ``slow_call_window_calls``."""
    last_trip: str
    """Why it last opened (``consecutive_failures: 5 failures in a row``); empty if never."""

    def as_dict(self) -> dict[str, Any]:
        """The readout as JSON-ready values."""
        return asdict(self)


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
        on_trip: TripHook | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._on_trip = on_trip
        self._lock = threading.Lock()
        self._cb = pybreaker.CircuitBreaker(
            reset_timeout=policy.open_s, name=target, listeners=[_Listener(on_transition)]
        )
        self._window = FailureWindow(policy.window_s, policy.window_buckets)
        self._speeds: deque[bool] = deque(maxlen=policy.slow_call_window_calls)
        self._slow_calls = 0  # of ``_speeds``
        self._consecutive = 0
        self._generation = 0
        self._opened_at = 0.0
        self._trials_issued = 0
        self._trials_passed = 0
        self._admitted = 0
        self._in_flight: dict[int, Permit] = {}
        #: Numbers of this generation's calls not yet seen slow, oldest first (some finished).
        self._unnoticed: deque[int] = deque()
        self._aborting: list[AbortHook] = []
        self._last_trip = ""
        #: The state machine's state (pybreaker's), kept here to be read without its locks.
        self._state: str = str(self._cb.current_state)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (pybreaker's names): the state machine's own."""
        return self._state

    def admit(self, on_abort: AbortHook | None = None) -> Permit:
        """Let one call through, or raise CallRefused without touching the network.

        Args:
            on_abort: Fails this call at once if the breaker opens while it is in flight.

        Raises:
            BreakerOpen: open, or half-open with every trial slot taken.
            ConcurrencyLimited: ``max_concurrent_calls`` attempts are in flight already.
        """
        try:
            with self._lock:
                return self._admit(on_abort)
        finally:
            if self._aborting:
                self._fire_aborts()

    def _admit(self, on_abort: AbortHook | None) -> Permit:
        now = self._clock()
        self._notice_slow(now)
        state = self._state
        if state == OPEN:
            waited = now - self._opened_at
            if waited < self.policy.open_s:
                raise BreakerOpen(self.target, self.policy.open_s - waited)
            self._transition(HALF_OPEN)
            state = HALF_OPEN
        trial = state == HALF_OPEN
        if trial and self._trials_issued >= self.policy.half_open_calls:
            raise BreakerOpen(self.target, 0.0)
        if len(self._in_flight) >= self.policy.max_concurrent_calls:
            # By then the oldest calls have answered, or count as slow and the breaker decides.
            retry = self.policy.slow_call_duration_s
            raise ConcurrencyLimited(self.target, retry, self.policy.max_concurrent_calls)
        if trial:
            self._trials_issued += 1
        self._admitted += 1
        number = self._admitted
        permit = self._in_flight[number] = Permit(number, self._generation, trial, now, on_abort)
        self._unnoticed.append(number)
        return permit

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """Account the outcome of an admitted call; may trip, close or reopen the breaker."""
        try:
            with self._lock:
                self._record(permit, outcome)
        finally:
            if self._aborting:
                self._fire_aborts()

    def record_success(self, permit: Permit) -> None:
        """``record(permit, Outcome.SUCCESS)``, short for the common case: a call answered
        within the slow-call duration by a closed breaker."""
        try:
            with self._lock:
                entry = self._in_flight.pop(permit.number, None)
                now = self._clock()
                if self._unnoticed:
                    self._notice_slow(now)
                if (
                    permit.generation != self._generation
                    or permit.trial
                    or (entry is not None and entry.slow)
                    or now - permit.started_at >= self.policy.slow_call_duration_s
                ):
                    self._settle(permit, Outcome.SUCCESS, entry, now)
                    return
                speeds = self._speeds
                if len(speeds) == speeds.maxlen:
                    self._slow_calls -= speeds[0]  # about to drop out of the window
                speeds.append(False)  # a fast call cannot trip the slow-call rule
                self._window.record_success(now)
                self._consecutive = 0
        finally:
            if self._aborting:
                self._fire_aborts()

    def _record(self, permit: Permit, outcome: Outcome) -> None:
        entry = self._in_flight.pop(permit.number, None)
        now = self._clock()
        self._notice_slow(now)
        self._settle(permit, outcome, entry, now)

    def _settle(self, permit: Permit, outcome: Outcome, entry: Permit | None, now: float) -> None:
        if permit.generation != self._generation:
            return  # admitted before the last transition: says nothing about now
        noticed = entry is not None and entry.slow
        slow = noticed or now - permit.started_at >= self.policy.slow_call_duration_s
        if permit.trial:
            self._record_trial(outcome, slow=slow)
            return
        if not noticed and (slow or outcome is not Outcome.IGNORED):
            self._count_speed(slow=slow)
            if permit.generation != self._generation:
                return
        if outcome is Outcome.IGNORED:
            return
        failed = outcome is Outcome.FAILURE
        self._window.record(now, failed=failed)
        if not failed:
            self._consecutive = 0
            return  # only a failure can tip a failure rule
        self._consecutive += 1
        if self._consecutive >= self.policy.consecutive_failures:
            self._trip("consecutive_failures", f"{self._consecutive} failures in a row")
            return
        failures, calls = self._window.failures, self._window.calls
        if calls >= self.policy.minimum_calls and failures >= self.policy.failure_rate * calls:
            self._trip(
                "failure_rate",
                f"{failures} of {calls} calls failed within {self.policy.window_s:g} s",
            )

    def _record_trial(self, outcome: Outcome, *, slow: bool) -> None:
        if slow:
            self._trip("trial_slow", "a trial call was slow")
        elif outcome is Outcome.IGNORED:
            self._trials_issued -= 1  # give the slot to another trial
        elif outcome is Outcome.FAILURE:
            self._trip("trial_failed", "a trial call failed")
        else:
            self._trials_passed += 1
            if self._trials_passed >= self.policy.half_open_calls:
                self._transition(CLOSED)

    def _notice_slow(self, now: float) -> None:
        """Count as slow each call of this generation that has been in flight too long."""
        horizon = now - self.policy.slow_call_duration_s
        queue, generation = self._unnoticed, self._generation
        while queue and generation == self._generation:
            entry = self._in_flight.get(queue[0])
            if entry is None:
                queue.popleft()  # finished: its speed was counted when it was recorded
                continue
            if entry.started_at > horizon:
                return
            queue.popleft()
            entry.slow = True
            if entry.trial:
                self._trip("trial_slow", "a trial call is still in flight, slow")
            else:
                self._count_speed(slow=True)

    def _count_speed(self, *, slow: bool) -> None:
        size = self.policy.slow_call_window_calls
        if len(self._speeds) == size:
            self._slow_calls -= self._speeds[0]  # about to drop out of the window
        self._speeds.append(slow)
        self._slow_calls += slow
        slow_calls = self._slow_calls
        # Empty places count as fast, so a new breaker never opens on its first slow call.
        if slow and slow_calls >= self.policy.slow_call_rate * size - 1e-9:
            self._trip(
                "slow_call_rate",
                f"{slow_calls} of the last {size} calls took "
                f">= {self.policy.slow_call_duration_s:g} s",
            )

    def _trip(self, rule: str, detail: str) -> None:
        self._last_trip = f"{rule}: {detail}"
        log.warning("circuit breaker of %s trips on %s", self.target, self._last_trip)
        if self._on_trip is not None:
            self._on_trip(self.target, rule)
        self._transition(OPEN)

    def _transition(self, state: str) -> None:
        self._generation += 1
        self._window.clear()
        self._speeds.clear()
        self._slow_calls = 0
        self._unnoticed.clear()
        self._consecutive = 0
        self._trials_issued = self._trials_passed = 0
        if state == OPEN:
            self._opened_at = self._clock()
            for entry in self._in_flight.values():
                if entry.abort is not None:
                    self._aborting.append(entry.abort)
                    entry.abort = None
            self._cb.open()
        elif state == HALF_OPEN:
            self._cb.half_open()
        else:
            self._cb.close()
        self._state = str(self._cb.current_state)

    def _fire_aborts(self) -> None:
        if not self._aborting:
            return
        with self._lock:
            hooks, self._aborting = self._aborting, []
        for hook in hooks:
            hook()

    def readout(self) -> BreakerReadout:
        """The state as an operator should read it, with the figures behind it."""
        with self._lock:
            now = self._clock()
            state = self.state
            left = 0.0
            if state == OPEN:
                left = max(0.0, self.policy.open_s - (now - self._opened_at))
                if left == 0.0:
                    state = HALF_OPEN_READY
            # Admitted in clock order, so the first entry in flight is the oldest.
            oldest = next(iter(self._in_flight.values()), None)
            waited = 0.0 if oldest is None else now - oldest.started_at
            self._window.advance(now)  # drop what expired since the last call
            return BreakerReadout(
                state=state,
                open_left_s=round(left, 3),
                in_flight=len(self._in_flight),
                max_concurrent_calls=self.policy.max_concurrent_calls,
                oldest_in_flight_s=round(waited, 3),
                consecutive_failures=self._consecutive,
                window_calls=self._window.calls,
                window_failures=self._window.failures,
                slow_calls=self._slow_calls,
                last_trip=self._last_trip,
            )


class BreakerRegistry:
    """The breakers of one process, one per target, made on first use."""

    def __init__(
        self,
        policy_of: Callable[[str], BreakerPolicy],
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionHook | None = None,
        on_trip: TripHook | None = None,
    ) -> None:
        self._policy_of = policy_of
        self._clock = clock
        self._on_transition = on_transition
        self._on_trip = on_trip
        self._lock = threading.Lock()
        self._breakers: dict[str, TargetBreaker] = {}

    def get(self, target: str) -> TargetBreaker:
        """The breaker of ``target``."""
        breaker = self._breakers.get(target)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.get(target)
                if breaker is None:
                    breaker = self._breakers[target] = TargetBreaker(
                        target,
                        self._policy_of(target),
                        clock=self._clock,
                        on_transition=self._on_transition,
                        on_trip=self._on_trip,
                    )
        return breaker

    def states(self) -> dict[str, str]:
        """State of every breaker made so far, by target, as its readout says it.

        ``half-open-ready`` is an open breaker whose open time has passed.
        """
        return {target: b.readout().state for target, b in sorted(self._breakers.items())}

    def readouts(self) -> dict[str, BreakerReadout]:
        """Readout of every breaker made so far, by target."""
        return {target: b.readout() for target, b in sorted(self._breakers.items())}
