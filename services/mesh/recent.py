"""A short memory of each outgoing edge: recent calls, failures, retries, p50/p99, last error.

Fed by the policy chain's hooks (one record per finished call, one tick per retry), read by
the Diagnostics RPC. A failure is what the breaker counts as one (the target looks
unhealthy), so a NOT_FOUND answer does not make an edge look broken. The last error keeps
its time and is cleared once the edge recovered: ``recovery_calls`` answers in a row after it
(a caller's own cancellation is no answer). No gRPC import.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from interceptors.codes import TARGET_UNHEALTHY
from interceptors.observe import RETRIES
from interceptors.telemetry import CallRecord, ChainTelemetry

Clock = Callable[[], float]

#: Seconds of history the figures cover.
DEFAULT_WINDOW_S = 60.0
#: Calls kept per target at most, so a busy edge cannot grow the window without bound.
MAX_CALLS_PER_TARGET = 10_000
#: Answers in a row after the last error that clear it: the edge recovered.
DEFAULT_RECOVERY_CALLS = 3
#: A final code that says nothing about the target either way: the caller gave up.
_NO_ANSWER = "CANCELLED"


def is_failure(code: str) -> bool:
    """Whether a final code says the target, not the request, is at fault."""
    return code in TARGET_UNHEALTHY


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeFigures:
    """What the recent window says about one target."""

    calls: int
    """Calls finished within the window."""
    failures: int
    """Of those, calls that failed in a way that says the target is unhealthy."""
    retries: int
    """Retries sent to the target within the window."""
    p99_s: float
    """99th percentile duration of the window's calls (0 when there were none)."""
    window_s: float
    """Seconds the figures cover: the window, or less just after start."""
    p50_s: float = 0.0
    """Median duration of the window's calls (0 when there were none)."""
    last_error: str = ""
    """Details of the most recent failed call; empty if none failed or the edge recovered
    since (``recovery_calls`` answers in a row)."""
    last_error_code: str = ""
    """Status code name of that call."""
    last_error_at: float | None = None
    """Wall-clock time (epoch seconds) of that call."""

    @property
    def error_rate(self) -> float:
        """Share of the window's calls that failed (0.0 to 1.0)."""
        return self.failures / self.calls if self.calls else 0.0

    @property
    def retries_per_s(self) -> float:
        """Retries per second over the window."""
        return self.retries / self.window_s if self.window_s > 0 else 0.0


class _Edge:
    def __init__(self) -> None:
        self.calls: deque[tuple[float, bool, float]] = deque(maxlen=MAX_CALLS_PER_TARGET)
        self.retries: deque[float] = deque(maxlen=MAX_CALLS_PER_TARGET)
        self.last_error = ""
        self.last_error_code = ""
        self.last_error_at: float | None = None
        self.answers_since_error = 0


class RecentCalls:
    """Per-target sliding window of finished calls and retries; thread-safe."""

    #: The only series :meth:`count` reads (its hook is registered for these alone).
    COUNTED = frozenset({RETRIES})

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        recovery_calls: int = DEFAULT_RECOVERY_CALLS,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if recovery_calls < 1:
            raise ValueError(f"recovery_calls must be at least 1, got {recovery_calls}")
        self.window_s = window_s
        self.recovery_calls = recovery_calls
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._lock = threading.Lock()
        self._edges: dict[str, _Edge] = {}
        #: Applied before every read: the chain hands its calls over in batches.
        self._sources: list[Callable[[], None]] = []

    def follow(self, telemetry: ChainTelemetry) -> None:
        """Take ``telemetry``'s finished calls and retries from now on, applying what it has
        queued before every read."""
        telemetry.add_call_hook(self.record_call)
        telemetry.add_hook(self.count, names=self.COUNTED)
        self._sources.append(telemetry.flush)

    def record_call(self, record: CallRecord) -> None:
        """Remember one finished call (a ``ChainTelemetry`` call hook)."""
        failed = is_failure(record.code)
        with self._lock:
            edge = self._edges.get(record.target)
            if edge is None:
                edge = self._edges[record.target] = _Edge()
            edge.calls.append((self._clock(), failed, record.duration_s))
            if failed:
                edge.last_error = record.error or record.code
                edge.last_error_code = record.code
                edge.last_error_at = self._wall_clock()
                edge.answers_since_error = 0
            elif edge.last_error_at is not None and record.code != _NO_ANSWER:
                edge.answers_since_error += 1
                if edge.answers_since_error >= self.recovery_calls:
                    edge.last_error, edge.last_error_code = "", ""
                    edge.last_error_at = None

    def count(self, name: str, labels: Mapping[str, str], amount: int) -> None:
        """Remember retries (a ``ChainTelemetry`` counter hook; other series are ignored)."""
        if name != RETRIES or "target" not in labels:
            return
        now = self._clock()
        with self._lock:
            edge = self._edges.setdefault(labels["target"], _Edge())
            edge.retries.extend([now] * amount)

    def figures(self, target: str) -> EdgeFigures:
        """The window's figures for ``target`` (all zero if it was never called)."""
        for flush in self._sources:
            flush()
        now = self._clock()
        horizon = now - self.window_s
        with self._lock:
            edge = self._edges.get(target)
            if edge is None:
                return EdgeFigures(
                    calls=0, failures=0, retries=0, p99_s=0.0, window_s=self._covered(now)
                )
            while edge.calls and edge.calls[0][0] <= horizon:
                edge.calls.popleft()
            while edge.retries and edge.retries[0] <= horizon:
                edge.retries.popleft()
            durations = sorted(duration for _, _, duration in edge.calls)
            return EdgeFigures(
                calls=len(edge.calls),
                failures=sum(1 for _, failed, _ in edge.calls if failed),
                retries=len(edge.retries),
                p99_s=percentile(durations, 0.99),
                p50_s=percentile(durations, 0.5),
                window_s=self._covered(now),
                last_error=edge.last_error,
                last_error_code=edge.last_error_code,
                last_error_at=edge.last_error_at,
            )

    def _covered(self, now: float) -> float:
        return min(self.window_s, now - self._started)


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when it is empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]
