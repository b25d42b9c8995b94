"""The one recovery scheduler, with scripted items and a fake clock: passes, backoff, hooks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest

from services.storage.resumable import Outcome, RecoveryLoop, RecoveryReport, RecoverySchedule
from tests.unit.fakes import FakeClock

log = logging.getLogger("test.recovery_loop")


@dataclass(frozen=True, slots=True)
class Item:
    key: str


class Work:
    """Items with scripted outcomes; an item finished or abandoned leaves the listing."""

    def __init__(self, *keys: str) -> None:
        self.left = list(keys)
        self.script: dict[str, list[Outcome | Exception]] = {}
        self.resumed: list[str] = []
        self.busy: set[str] = set()
        self.down: dict[str, float] = {}

    def unfinished(self) -> list[Item]:
        return [Item(key) for key in self.left]

    async def resume(self, item: Item) -> Outcome:
        self.resumed.append(item.key)
        script = self.script.get(item.key, [])
        outcome = script.pop(0) if script else Outcome.FINISHED
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is not Outcome.PENDING:
            self.left.remove(item.key)
        return outcome

    def wait_s(self, item: Item) -> float:
        return self.down.get(item.key, 0.0)


def _loop(work: Work, clock: FakeClock, schedule: RecoverySchedule) -> RecoveryLoop[Item]:
    return RecoveryLoop(
        unfinished=work.unfinished,
        resume=work.resume,
        log=log,
        what="items",
        schedule=schedule,
        busy=work.busy.__contains__,
        wait_s=work.wait_s,
        clock=clock,
        rng=lambda: 1.0,  # the jitter's upper bound: the backoff is exact
    )


async def test_without_backoff_a_pending_item_is_retried_by_the_very_next_pass() -> None:
    clock, work = FakeClock(), Work("a")
    work.script["a"] = [Outcome.PENDING, Outcome.PENDING]
    loop = _loop(work, clock, RecoverySchedule.passes_only(0.1))
    for _ in range(3):
        assert loop.next_pass_in_s() == pytest.approx(0.1)
        await loop.run_once()
        clock.advance(0.1)
    assert work.resumed == ["a", "a", "a"]
    assert work.left == []


async def test_with_backoff_a_pending_item_waits_and_the_next_pass_comes_when_it_ends() -> None:
    clock, work = FakeClock(), Work("a")
    work.script["a"] = [Outcome.PENDING]
    loop = _loop(work, clock, RecoverySchedule(interval_s=30.0, initial_backoff_s=2.0))
    assert await loop.run_once() == RecoveryReport(pending=1)
    assert loop.next_pass_in_s() == pytest.approx(2.0)
    clock.advance(1.0)
    assert await loop.run_once() == RecoveryReport(waiting=1)
    clock.advance(1.0)
    assert await loop.run_once() == RecoveryReport(finished=1)
    assert work.resumed == ["a", "a"]
    assert loop.next_pass_in_s() == 30.0


async def test_an_item_whose_dependency_is_down_waits_without_a_call_or_a_failure() -> None:
    clock, work = FakeClock(), Work("a")
    work.down["a"] = 5.0
    loop = _loop(work, clock, RecoverySchedule(interval_s=30.0, initial_backoff_s=1.0))
    assert await loop.run_once() == RecoveryReport(waiting=1)
    assert work.resumed == []
    assert loop.next_pass_in_s() == pytest.approx(5.0)
    clock.advance(5.0)
    work.down.clear()
    assert await loop.run_once() == RecoveryReport(finished=1)


async def test_busy_items_are_left_to_their_request_and_broken_ones_do_not_stop_others() -> None:
    clock, work = FakeClock(), Work("a", "b", "c")
    work.busy.add("a")
    work.script["b"] = [RuntimeError("bug")]
    loop = _loop(work, clock, RecoverySchedule.passes_only(1.0))
    assert await loop.run_once() == RecoveryReport(finished=1, pending=1)
    assert work.resumed == ["b", "c"]


async def test_abandoned_items_are_counted_and_a_gone_item_no_longer_paces_the_passes() -> None:
    clock, work = FakeClock(), Work("a", "b")
    work.script = {"a": [Outcome.PENDING], "b": [Outcome.ABANDONED]}
    loop = _loop(work, clock, RecoverySchedule(interval_s=30.0, initial_backoff_s=4.0))
    assert await loop.run_once() == RecoveryReport(abandoned=1, pending=1)
    assert loop.next_pass_in_s() == pytest.approx(4.0)
    work.left.remove("a")  # finished by someone else since
    await loop.run_once()
    assert loop.next_pass_in_s() == 30.0


async def test_start_runs_a_pass_at_once_and_a_failed_listing_does_not_end_recovery() -> None:
    clock, work = FakeClock(), Work("a")
    listings = 0

    def unfinished() -> list[Item]:
        nonlocal listings
        listings += 1
        if listings == 1:
            raise RuntimeError("store unavailable")
        return work.unfinished()

    passes = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if listings >= 2:
            passes.set()
        await asyncio.sleep(0)

    loop = RecoveryLoop(
        unfinished=unfinished,
        resume=work.resume,
        log=log,
        what="items",
        schedule=RecoverySchedule.passes_only(7.0),
        clock=clock,
        sleep=sleep,
    )
    loop.start()
    await asyncio.wait_for(passes.wait(), timeout=5)
    await loop.close()
    assert work.resumed == ["a"]
    assert slept[:2] == [7.0, 7.0]


def test_schedule_without_backoff_and_bad_mixes() -> None:
    assert not RecoverySchedule.passes_only(0.1).backs_off
    assert RecoverySchedule().backs_off
    for bad in (
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": -1.0},
        {"interval_s": float("inf")},
    ):
        with pytest.raises(ValueError):
            RecoverySchedule(**bad)
