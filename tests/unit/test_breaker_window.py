"""The bucketed failure-rate window against an exact sliding window kept in the test: same
totals and the same open/closed decision except within one bucket of the window's edge, and
work per call bounded by the number of buckets, not by the calls the window holds."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptors.breaker import Outcome, TargetBreaker
from interceptors.policy import BreakerPolicy
from interceptors.window import FailureWindow
from tests.unit.fakes import FakeClock

F, S, IGN = Outcome.FAILURE, Outcome.SUCCESS, Outcome.IGNORED
#: Slack for float rounding of ``now / bucket_s`` at a bucket's boundary (clock near 1000 s).
EPSILON_S = 1e-9


class ExactWindow:
    """The reference: every call kept with its time; one counts while ``now - t < window_s``
    (the breaker's definition before it was bucketed)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.calls: list[tuple[float, bool]] = []

    def record(self, now: float, *, failed: bool) -> None:
        self.calls.append((now, failed))

    def totals(self, now: float) -> tuple[int, int]:
        live = [failed for t, failed in self.calls if t > now - self.window_s]
        return len(live), sum(live)

    def near_edge(self, now: float, bucket_s: float) -> bool:
        """Whether a call lies within one bucket before the edge, ``(edge - bucket_s, edge]``:
        the only calls the bucketed window may still count when the exact one does not."""
        edge = now - self.window_s
        return any(edge - bucket_s - EPSILON_S < t <= edge + EPSILON_S for t, _ in self.calls)


#: Steps: how far the clock moves before the call, in thousandths of the window, and its outcome.
steps = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 50), st.integers(0, 1500)),
        st.sampled_from([F, F, S, S, IGN]),
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    window_s=st.sampled_from([0.5, 1.0, 7.3, 60.0]),
    buckets=st.integers(1, 80),
    moves=steps,
)
def test_window_totals_equal_the_exact_windows_away_from_the_edge(
    window_s: float, buckets: int, moves: list[tuple[int, Outcome]]
) -> None:
    clock = FakeClock()
    window, exact = FailureWindow(window_s, buckets), ExactWindow(window_s)
    for thousandths, outcome in moves:
        clock.advance(window_s * thousandths / 1000)
        if outcome is not IGN:
            window.record(clock.now, failed=outcome is F)
            exact.record(clock.now, failed=outcome is F)
        window.advance(clock.now)
        if not exact.near_edge(clock.now, window.bucket_s):
            assert (window.calls, window.failures) == exact.totals(clock.now)


@settings(max_examples=300, deadline=None)
@given(
    window_s=st.sampled_from([1.0, 7.3, 60.0]),
    buckets=st.integers(1, 80),
    minimum_calls=st.integers(1, 12),
    failure_rate=st.sampled_from([0.1, 0.5, 0.6, 0.75, 1.0]),
    consecutive_failures=st.sampled_from([5, 1000, 1000]),
    moves=st.lists(
        st.tuples(st.one_of(st.integers(0, 8), st.integers(0, 200)), st.sampled_from([F, S])),
        min_size=1,
        max_size=200,
    ),
)
def test_breaker_opens_exactly_when_the_exact_window_says_so_away_from_the_edge(
    window_s: float,
    buckets: int,
    minimum_calls: int,
    failure_rate: float,
    consecutive_failures: int,
    moves: list[tuple[int, Outcome]],
) -> None:
    """Tolerance: at a call at ``now`` the two decisions may differ only if some earlier call
    lies in ``(now - window_s - bucket_s, now - window_s]``; everywhere else they are equal.
    The clock moves in quarters of a bucket, so calls often sit just inside or outside it."""
    clock = FakeClock()
    policy = dataclasses.replace(
        BreakerPolicy(),
        window_s=window_s,
        window_buckets=buckets,
        minimum_calls=minimum_calls,
        failure_rate=failure_rate,
        consecutive_failures=consecutive_failures,
    )
    breaker = TargetBreaker("order-service", policy, clock=clock)
    exact, in_a_row = ExactWindow(window_s), 0
    for quarters, outcome in moves:
        clock.advance(window_s / buckets * quarters / 4)
        ambiguous = exact.near_edge(clock.now, window_s / buckets)
        breaker.record(breaker.admit(), outcome)  # admitted and answered at once: never slow
        exact.record(clock.now, failed=outcome is F)
        in_a_row = in_a_row + 1 if outcome is F else 0
        calls, failures = exact.totals(clock.now)
        opens = outcome is F and (
            in_a_row >= consecutive_failures
            or (calls >= minimum_calls and failures >= failure_rate * calls)
        )
        if not ambiguous:
            assert breaker.state == ("open" if opens else "closed")
            if not opens:  # and the figures it decided on are the exact window's
                reading = breaker.readout()
                assert (reading.window_calls, reading.window_failures) == (calls, failures)
        if breaker.state == "open":  # close it again; the new state counts afresh
            clock.advance(policy.open_s + 1)  # (+1: float time never falls short of it)
            for _ in range(policy.half_open_calls):
                breaker.record(breaker.admit(), S)
            assert breaker.state == "closed"
            exact, in_a_row = ExactWindow(window_s), 0


def test_a_call_counts_longer_than_the_window_and_at_most_one_bucket_more() -> None:
    window = FailureWindow(60.0, 60)
    window.record(1000.5, failed=True)
    window.advance(1060.4)  # 59.9 s later
    assert window.failures == 1
    window.advance(1060.9)  # 60.4 s later: past the exact window, still in its bucket
    assert window.failures == 1
    window.advance(1061.0)  # 60.5 s later: its bucket has left the window
    assert (window.calls, window.failures) == (0, 0)


def test_buckets_emptied_depend_on_time_passed_not_on_calls_recorded() -> None:
    def emptied(calls: int) -> int:
        window = FailureWindow(60.0, 60)
        for i in range(calls + 1):  # 1000 s to 1180 s, three windows of time, at any rate
            window.record(1000.0 + 180.0 * i / calls, failed=i % 2 == 0)
        return window.buckets_cleared

    assert emptied(1_000) == emptied(100_000) == 180


def test_one_call_empties_at_most_every_bucket_once() -> None:
    window = FailureWindow(60.0, 60)
    most = 0
    now = 1000.0
    for gap_s in [0.001] * 5000 + [3600.0] + [0.001] * 5000 + [59.0, 61.0, 1e6]:
        now += gap_s
        before = window.buckets_cleared
        window.record(now, failed=True)
        most = max(most, window.buckets_cleared - before)
    assert most == 61  # the 60 buckets of the window and the one now filling


def test_a_transition_forgets_the_window() -> None:
    clock = FakeClock()
    policy = dataclasses.replace(BreakerPolicy(), consecutive_failures=100)
    breaker = TargetBreaker("order-service", policy, clock=clock)
    for outcome in (S, S, F, F, F):  # 3 of 5 failed: trips on the failure rate
        breaker.record(breaker.admit(), outcome)
    clock.advance(30)
    for _ in range(3):
        breaker.record(breaker.admit(), S)  # the trials close it
    reading = breaker.readout()
    assert (reading.state, reading.window_calls, reading.window_failures) == ("closed", 0, 0)
