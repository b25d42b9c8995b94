"""The step runner every multi-step flow runs on: one shielded task per id, committed steps.

The work here is a dict of committed steps; each step waits on an event the test sets, so the
test decides exactly where a cancellation or a close lands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.storage.resumable import StepRunner

STEPS = ("first", "second", "done")


@dataclass(frozen=True, slots=True)
class Work:
    key: str
    step: str


class Flow:
    """Committed steps in memory; each step waits until the test lets it through."""

    def __init__(self) -> None:
        self.committed: dict[str, str] = {"w_1": "first"}
        self.gate = asyncio.Event()
        self.started: list[str] = []
        self.runner: StepRunner[Work] = StepRunner(
            load=lambda key: Work(key, self.committed[key]),
            done=lambda work: work.step == "done",
            step_of=lambda work: work.step,
        )

    async def step(self, work: Work) -> Work:
        self.started.append(work.step)
        await self.gate.wait()
        self.committed[work.key] = STEPS[STEPS.index(work.step) + 1]
        return Work(work.key, self.committed[work.key])


async def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.001)


async def test_a_caller_hanging_up_does_not_stop_the_work() -> None:
    flow = Flow()
    caller = asyncio.create_task(flow.runner.run("w_1", flow.step))
    await _until(lambda: flow.started == ["first"])
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert flow.runner.running("w_1")
    flow.gate.set()
    await _until(lambda: not flow.runner.running("w_1"))
    assert flow.committed["w_1"] == "done"


async def test_a_second_caller_joins_the_running_work_instead_of_repeating_it() -> None:
    flow = Flow()
    first = asyncio.create_task(flow.runner.run("w_1", flow.step))
    second = asyncio.create_task(flow.runner.run("w_1", flow.step))
    await _until(lambda: flow.started == ["first"])
    flow.gate.set()
    assert await first == await second == Work("w_1", "done")
    assert flow.started == ["first", "second"]  # each step ran once


async def test_close_stops_the_work_at_its_last_committed_step() -> None:
    flow = Flow()
    caller = asyncio.create_task(flow.runner.run("w_1", flow.step))
    await _until(lambda: flow.started == ["first"])
    await flow.runner.close()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert flow.committed["w_1"] == "first"
    assert not flow.runner.running("w_1")


async def test_a_step_that_does_not_move_ends_the_run_for_a_later_retry() -> None:
    flow = Flow()

    async def outage(work: Work) -> Work:
        return work  # nothing committed: the dependency is down

    assert await flow.runner.run("w_1", outage) == Work("w_1", "first")
    assert not flow.runner.running("w_1")


async def test_a_failing_step_reaches_the_caller_and_frees_the_id() -> None:
    flow = Flow()

    async def broken(work: Work) -> Work:
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        await flow.runner.run("w_1", broken)
    assert not flow.runner.running("w_1")
    assert flow.committed["w_1"] == "first"
