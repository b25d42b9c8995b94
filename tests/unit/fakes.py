"""Fake time and a scripted transport for the policy core's unit tests."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from interceptors.attempts import Attempt
from interceptors.breaker import CallRefused
from interceptors.retry import AttemptFailure


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Failed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class GaveUp(Exception):
    def __init__(self, what: str, attempts: int, reason: str) -> None:
        super().__init__(what)
        self.what, self.attempts, self.reason = what, attempts, reason


class ScriptedOutcomes:
    """Each attempt pops the next outcome: a code to fail with, or ``OK``."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = deque(outcomes)
        self.timeouts: list[float] = []

    def _next(self, attempt: Attempt) -> str:
        self.timeouts.append(attempt.timeout_s)
        code = self.outcomes.popleft()
        if code != "OK":
            raise Failed(code)
        return "answer"

    def classify(self, error: BaseException) -> AttemptFailure | None:
        return AttemptFailure(code=error.code, detail="x") if isinstance(error, Failed) else None

    def answer_code(self, result: Any) -> str:
        return "OK"

    def deadline_exhausted(self, problem: str) -> BaseException:
        return GaveUp("deadline", 0, "deadline")

    def refused(self, refusal: CallRefused, attempts: int) -> BaseException:
        return GaveUp("refused", attempts, "breaker_open")

    def aborted(self, attempts: int, open_s: float) -> BaseException:
        return GaveUp("aborted", attempts, "breaker_open")

    def gave_up(
        self, failure: AttemptFailure, error: BaseException, attempts: int, reason: str
    ) -> BaseException:
        return GaveUp(failure.code, attempts, reason)


class Scripted(ScriptedOutcomes):
    """The sync transport."""

    def attempt(self, attempt: Attempt) -> str:
        return self._next(attempt)

    def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        pass


class AsyncScripted(ScriptedOutcomes):
    """The async transport: the same script, awaited; ``HANG`` waits until cancelled."""

    async def attempt(self, attempt: Attempt) -> str:
        if self.outcomes and self.outcomes[0] == "HANG":
            self.outcomes.popleft()
            hung = asyncio.ensure_future(asyncio.sleep(3600))
            attempt.attach(hung)  # as a grpc.aio call or an HTTP exchange is
            await hung
        return self._next(attempt)

    async def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        pass
