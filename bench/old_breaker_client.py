"""A faithful Python port of the seed's Go ``httpclient.BreakerClient``: the replaced pattern.

Kept only so ``make bench`` can run the old pattern on the same workload as the chain. The numbers
are the seed report's: a sony/gobreaker breaker (MaxRequests 3, Interval 1 min, Timeout 30 s,
ReadyToTrip = requests >= 5 and failure ratio >= 0.6) around a retry loop that repeats every
call, idempotent or not, 3 times (1 s, 2 s, 4 s apart) with 30 s per attempt and no overall
deadline. As in the seed's scenario ("requests 1-4: 4 attempts each; request 5 trips it"), the
breaker wraps the whole retried call, so it counts one outcome per call, not per attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

import grpc
from grpc import aio

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: gRPC codes whose HTTP equivalent is a 5xx (or a transport error): what the Go client retried.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)


class State(Enum):
    """gobreaker's states."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class BreakerOpenError(Exception):
    """gobreaker's ErrOpenState: the breaker is open."""


class TooManyRequestsError(Exception):
    """gobreaker's ErrTooManyRequests: half-open and MaxRequests trials already running."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OldBreakerConfig:
    """The seed's BreakerConfig and retry Config, every duration multiplied by ``time_scale``."""

    max_requests: int = 3
    """gobreaker MaxRequests: trial calls half-open, and consecutive successes that close it."""
    interval_s: float = 60.0
    """gobreaker Interval: the closed state's counts are cleared this often (a fixed window)."""
    open_timeout_s: float = 30.0
    """gobreaker Timeout: how long it stays open."""
    min_requests: int = 5
    """ReadyToTrip: counts.Requests >= this ..."""
    failure_ratio: float = 0.6
    """... and TotalFailures / Requests >= this."""
    attempt_timeout_s: float = 30.0
    """http.Client Timeout: per attempt; nothing bounds the call as a whole."""
    max_retries: int = 3
    """Retries after the first attempt, for every method."""
    retry_delay_s: float = 1.0
    """Sleep before the first retry, doubled before each next one (1 s, 2 s, 4 s)."""

    @classmethod
    def scaled(cls, time_scale: float) -> OldBreakerConfig:
        """The seed's numbers with every duration multiplied by ``time_scale``."""
        base = cls()
        return cls(
            interval_s=base.interval_s * time_scale,
            open_timeout_s=base.open_timeout_s * time_scale,
            attempt_timeout_s=base.attempt_timeout_s * time_scale,
            retry_delay_s=base.retry_delay_s * time_scale,
        )


@dataclass(slots=True)
class Counts:
    """gobreaker.Counts of the current generation."""

    requests: int = 0
    total_successes: int = 0
    total_failures: int = 0
    consecutive_successes: int = 0
    consecutive_failures: int = 0

    def on_success(self) -> None:
        self.total_successes += 1
        self.consecutive_successes += 1
        self.consecutive_failures = 0

    def on_failure(self) -> None:
        self.total_failures += 1
        self.consecutive_failures += 1
        self.consecutive_successes = 0


@dataclass(slots=True)
class GoBreaker:
    """sony/gobreaker's CircuitBreaker: generations, fixed-interval counts, half-open trials."""

    config: OldBreakerConfig
    clock: Clock = time.monotonic
    state: State = State.CLOSED
    generation: int = 0
    counts: Counts = field(default_factory=Counts)
    expiry: float = 0.0
    transitions: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._new_generation(self.clock())

    def _ready_to_trip(self) -> bool:
        c = self.counts
        return (
            c.requests >= self.config.min_requests
            and c.total_failures / c.requests >= self.config.failure_ratio
        )

    def _new_generation(self, now: float) -> None:
        self.generation += 1
        self.counts = Counts()
        if self.state is State.CLOSED:
            self.expiry = now + self.config.interval_s if self.config.interval_s > 0 else 0.0
        elif self.state is State.OPEN:
            self.expiry = now + self.config.open_timeout_s
        else:
            self.expiry = 0.0

    def _set_state(self, state: State, now: float) -> None:
        if self.state is not state:
            self.state = state
            self.transitions.append((now, state.value))
            self._new_generation(now)

    def _current_state(self, now: float) -> State:
        if self.state is State.CLOSED and self.expiry and self.expiry < now:
            self._new_generation(now)
        elif self.state is State.OPEN and self.expiry < now:
            self._set_state(State.HALF_OPEN, now)
        return self.state

    def before_request(self) -> int:
        """Admit a request (its generation) or raise, like gobreaker's beforeRequest."""
        state = self._current_state(self.clock())
        if state is State.OPEN:
            raise BreakerOpenError("circuit breaker is open")
        if state is State.HALF_OPEN and self.counts.requests >= self.config.max_requests:
            raise TooManyRequestsError("too many requests")
        self.counts.requests += 1
        return self.generation

    def after_request(self, generation: int, success: bool) -> None:
        """Record an outcome of ``generation``, like gobreaker's afterRequest."""
        now = self.clock()
        state = self._current_state(now)
        if generation != self.generation:
            return
        if success:
            self.counts.on_success()
            if (
                state is State.HALF_OPEN
                and self.counts.consecutive_successes >= self.config.max_requests
            ):
                self._set_state(State.CLOSED, now)
        else:
            self.counts.on_failure()
            # Closed: trip when ReadyToTrip says so; half-open: any failure reopens it.
            if state is State.HALF_OPEN or (state is State.CLOSED and self._ready_to_trip()):
                self._set_state(State.OPEN, now)

    async def execute(self, request: Callable[[], Awaitable[T]]) -> T:
        """gobreaker's Execute: any exception of ``request`` is a failure."""
        generation = self.before_request()
        try:
            result = await request()
        except BaseException:
            self.after_request(generation, success=False)
            raise
        self.after_request(generation, success=True)
        return result


class OldBreakerClient:
    """``BreakerClient.Do``: breaker.Execute around up to 1 + MaxRetries attempts of anything."""

    def __init__(
        self,
        config: OldBreakerConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.breaker = GoBreaker(config, clock)
        self._sleep = sleep
        self.attempts_sent = 0
        """Attempts that went to the transport (the breaker admitted their call)."""

    async def call(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """Run ``attempt(timeout_s)`` through the breaker, retrying server errors blindly."""

        async def with_retries() -> T:
            delay = self.config.retry_delay_s
            for number in range(self.config.max_retries + 1):
                self.attempts_sent += 1
                try:
                    return await attempt(self.config.attempt_timeout_s)
                except aio.AioRpcError as err:
                    if err.code() not in SERVER_ERROR_CODES or number == self.config.max_retries:
                        raise
                await self._sleep(delay)
                delay *= 2
            raise AssertionError("unreachable")

        return await self.breaker.execute(with_retries)
