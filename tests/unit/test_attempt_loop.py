"""The one attempt loop with a scripted transport, a fake clock and a recording observer.

No gRPC and no network: what the loop decides and what it reports, event by event, for the
sync and the async variant alike (they are one loop).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest

from interceptors.attempts import Attempt, Call, run_call, run_call_sync
from interceptors.breaker import CallRefused
from interceptors.deadline import OutgoingDeadline
from interceptors.observe import CallReport
from interceptors.policy import PolicyConfig
from interceptors.retry import AttemptFailure
from interceptors.runtime import ChainRuntime
from tests.unit.fakes import AsyncScripted, FakeClock, GaveUp, Scripted

CALL = Call(target="t", method="/pkg.S/Read", safe=True, attempt_name="Read attempt")


class Recording:
    """An observer that writes down every event."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def start_call(self, call: Call) -> CallReport:
        self.events.append(("start", call.method))
        return _Report(self.events)

    def stream_deadline(self, target: str, method: str, *, propagated: bool) -> None:
        pass

    def stream_deadline_exhausted(self, target: str, method: str) -> None:
        pass

    def breaker_transition(self, target: str, old: str, new: str) -> None:
        self.events.append(("transition", old, new))

    def breaker_tripped(self, target: str, rule: str) -> None:
        self.events.append(("tripped", rule))


class _Report:
    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events

    def deadline_set(self, deadline: OutgoingDeadline) -> None:
        self.events.append(("deadline", deadline.timeout_s))

    def deadline_exhausted(self) -> None:
        self.events.append(("deadline_exhausted",))

    def attempt_refused(self, number: int, refusal: CallRefused) -> None:
        self.events.append(("refused", number))

    def attempt_started(self, number: int) -> tuple[None, None]:
        self.events.append(("attempt", number))
        return None, None

    def attempt_answered(self, code: str) -> None:
        self.events.append(("answered", code))

    def attempt_failed(self, failure: AttemptFailure) -> None:
        self.events.append(("failed", failure.code))

    def attempt_aborted(self, open_s: float) -> None:
        self.events.append(("aborted",))

    def retry_scheduled(self, delay_s: float) -> None:
        self.events.append(("retry", delay_s))

    def stopped(self, reason: str, failure: AttemptFailure | None) -> None:
        self.events.append(("stopped", reason))

    def ended(self, code: str, error: str, *, attempts: int, failed: bool) -> None:
        self.events.append(("ended", code, attempts))


def runtime(policy: dict[str, Any] | None = None) -> tuple[ChainRuntime, Recording, list[float]]:
    clock, slept = FakeClock(), []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    async def async_sleep(seconds: float) -> None:
        sleep(seconds)

    config = PolicyConfig.from_mapping({"defaults": policy or {}})
    rt = ChainRuntime(
        caller="c", config=config, clock=clock, sleep=async_sleep, sync_sleep=sleep, rng=lambda: 1.0
    )
    rt.observer = recording = Recording()
    return rt, recording, slept


RETRIED_TWICE = [
    ("start", "/pkg.S/Read"),
    ("deadline", 5.0),
    ("attempt", 1),
    ("failed", "UNAVAILABLE"),
    ("retry", 0.05),
    ("attempt", 2),
    ("failed", "UNAVAILABLE"),
    ("retry", 0.1),
    ("attempt", 3),
    ("answered", "OK"),
    ("ended", "OK", 3),
]


def test_sync_loop_retries_with_backoff_and_reports_every_event() -> None:
    rt, recording, slept = runtime()
    transport = Scripted("UNAVAILABLE", "UNAVAILABLE", "OK")
    assert run_call_sync(transport, CALL, rt) == "answer"
    assert recording.events == RETRIED_TWICE
    assert slept == [0.05, 0.1]
    assert transport.timeouts == pytest.approx([5.0, 4.95, 4.85])  # the deadline's remainder


def test_async_loop_is_the_same_loop() -> None:
    rt, recording, slept = runtime()
    transport = AsyncScripted("UNAVAILABLE", "UNAVAILABLE", "OK")
    assert asyncio.run(run_call(transport, CALL, rt)) == "answer"
    assert (recording.events, slept) == (RETRIED_TWICE, [0.05, 0.1])


def test_a_code_not_retryable_stops_at_once_with_the_adapters_error() -> None:
    rt, recording, slept = runtime()
    with pytest.raises(GaveUp) as caught:
        run_call_sync(Scripted("NOT_FOUND"), CALL, rt)
    assert (caught.value.what, caught.value.attempts, caught.value.reason) == (
        "NOT_FOUND",
        1,
        "not_retryable",
    )
    assert recording.events[-2:] == [("stopped", "not_retryable"), ("ended", "NOT_FOUND", 1)]
    assert slept == []


def test_an_open_breaker_refuses_the_next_call_before_it_is_sent() -> None:
    rt, recording, _ = runtime(
        {"retry": {"max_attempts": 1}, "breaker": {"consecutive_failures": 1}}
    )
    with pytest.raises(GaveUp):
        run_call_sync(Scripted("UNAVAILABLE"), CALL, rt)
    assert ("tripped", "consecutive_failures") in recording.events
    recording.events.clear()
    transport = Scripted("OK")
    with pytest.raises(GaveUp) as caught:
        run_call_sync(transport, CALL, rt)
    assert (caught.value.what, caught.value.attempts) == ("refused", 0)
    assert recording.events == [
        ("start", "/pkg.S/Read"),
        ("deadline", 5.0),
        ("refused", 1),
        ("stopped", "breaker_open"),
        ("ended", "UNAVAILABLE", 0),
    ]
    assert transport.outcomes == deque(["OK"])  # never attempted


def test_an_error_that_is_no_answer_is_reraised_as_is_and_ignored_by_the_breaker() -> None:
    rt, recording, _ = runtime({"breaker": {"consecutive_failures": 1}})

    class Broken(Scripted):
        def attempt(self, attempt: Attempt) -> str:
            raise KeyError("bug")

    with pytest.raises(KeyError):
        run_call_sync(Broken(), CALL, rt)
    assert recording.events[-1] == ("ended", "UNKNOWN", 1)
    assert rt.breakers.states() == {"t": "closed"}
