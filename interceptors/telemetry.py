"""In-process counters of the client chain, the seed of its Prometheus series.

The chain's observer (``observe.ChainObserver``, which names every series) counts here:
attempts, retries, stop reasons, budget exhaustion, breaker events, deadlines, and each
finished call with its duration; hooks let a metrics exporter or a recent-calls window
follow each increment. No gRPC import.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]
#: Series of finished calls, by target, method and final code (see ``record_call``).
CALLS = "calls_total"
#: Called on each increment with (series name, labels, amount).
CounterHook = Callable[[str, Mapping[str, str], int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One finished call as its caller saw it, retries and backoff included."""

    target: str
    """Mesh name of the service or partner called."""
    method: str
    """Full gRPC method (``/pkg.Service/Method``) or ``VERB /path`` of a partner call."""
    code: str
    """Final status code name (``OK``, ``UNAVAILABLE``, ...)."""
    duration_s: float
    """Seconds from the call's start to its final answer."""
    error: str = ""
    """Details of the final error; empty when the call succeeded."""


#: Called once per finished call.
CallHook = Callable[[CallRecord], None]
#: Hot series kept resolved (per target, method and code); partner methods carry ids in their
#: paths, so the cache is bounded and the rest are resolved per increment.
MAX_BOUND_SERIES = 4096


@dataclass(frozen=True, slots=True)
class BoundSeries:
    """One series resolved once: its key in the counters and its labels for the hooks."""

    key: tuple[str, Labels]
    labels: Mapping[str, str]


class ChainTelemetry:
    """Counters by series name and labels; thread-safe."""

    def __init__(self, *, caller: str, hooks: tuple[CounterHook, ...] = ()) -> None:
        self.caller = caller
        self._hooks = list(hooks)
        self._hook_names: list[frozenset[str] | None] = [None] * len(self._hooks)
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, Labels]] = Counter()
        self._call_hooks: list[CallHook] = []
        self._calls: dict[tuple[str, str, str], BoundSeries] = {}

    def add_hook(self, hook: CounterHook, *, names: Collection[str] | None = None) -> None:
        """Follow every increment from now on (a Prometheus exporter, a test); with
        ``names``, those series' only (the hook is then not called for the others)."""
        self._hooks.append(hook)
        self._hook_names.append(None if names is None else frozenset(names))

    def add_call_hook(self, hook: CallHook) -> None:
        """Follow every finished call from now on (latency histograms, recent-call windows)."""
        self._call_hooks.append(hook)

    def record_call(self, record: CallRecord) -> None:
        """Count a finished call in ``calls_total`` and hand it to the call hooks."""
        series = self._calls.get((record.target, record.method, record.code))
        if series is None:
            series = self.bound(CALLS, target=record.target, method=record.method, code=record.code)
            if len(self._calls) < MAX_BOUND_SERIES:
                self._calls[(record.target, record.method, record.code)] = series
        self.add(series)
        for hook in self._call_hooks:
            hook(record)

    def bound(self, name: str, **labels: str) -> BoundSeries:
        """Series ``name`` with ``labels``, resolved once, for :meth:`add` (a hot counter)."""
        return BoundSeries(key=(name, tuple(sorted(labels.items()))), labels=labels)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to series ``name`` with ``labels``."""
        self.add(BoundSeries(key=(name, tuple(sorted(labels.items()))), labels=labels), amount)

    def add(self, series: BoundSeries, amount: int = 1) -> None:
        """Add ``amount`` to a series from :meth:`bound`."""
        with self._lock:
            self._counters[series.key] += amount
        name = series.key[0]
        for hook, names in zip(self._hooks, self._hook_names, strict=True):
            if names is None or name in names:
                hook(name, series.labels, amount)

    def value(self, name: str, **labels: str) -> int:
        """Sum of the series ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        with self._lock:
            return sum(
                count
                for (series, series_labels), count in self._counters.items()
                if series == name and wanted <= set(series_labels)
            )

    def snapshot(self) -> dict[str, dict[Labels, int]]:
        """Every series, by name then labels."""
        out: dict[str, dict[Labels, int]] = {}
        with self._lock:
            for (name, labels), count in self._counters.items():
                out.setdefault(name, {})[labels] = count
        return out
