"""In-process counters of the client chain, the seed of its Prometheus series.

The chain's observer (``observe.ChainObserver``, which names every series) counts here:
attempts, retries, stop reasons, budget exhaustion, breaker events, deadlines, and each
finished call with its duration; hooks let a metrics exporter or a recent-calls window
follow each increment. No gRPC import.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
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
#: Increments and finished calls queued before the caller applies them itself (an event loop
#: too busy to run the scheduled batch must not let the queue grow without bound).
MAX_QUEUED = 4096
#: How long queued counting waits on an event loop before it is applied in one batch. Every
#: reader applies the queue first, so nothing read is ever late; one batch per call instead
#: (a timer due at once) cost each call ~40 us of CPU, an event-loop turn of its own
#: (measured for issue 11).
FLUSH_DELAY_S = 0.25


@dataclass(frozen=True, slots=True)
class BoundSeries:
    """One series resolved once: its key in the counters and its labels for the hooks."""

    key: tuple[str, Labels]
    labels: Mapping[str, str]


class ChainTelemetry:
    """Counters by series name and labels; thread-safe.

    Calls do not wait for the counting: an increment or a finished call is appended to a
    queue (one ``deque.append``) and applied in batches, to the counters and then to the
    hooks, within ``FLUSH_DELAY_S`` on the event loop that made it (a blocking caller with no
    loop applies its own at once). Everything that reads applies what is queued first
    (:meth:`value`, :meth:`snapshot`, :meth:`flush`), so a reader never sees less than what
    happened.
    """

    def __init__(self, *, caller: str, hooks: tuple[CounterHook, ...] = ()) -> None:
        self.caller = caller
        self._hooks = list(hooks)
        self._hook_names: list[frozenset[str] | None] = [None] * len(self._hooks)
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, Labels]] = Counter()
        self._call_hooks: list[CallHook] = []
        #: Per series name, the counter hooks that follow it (worked out on first use).
        self._hooks_of: dict[str, tuple[CounterHook, ...]] = {}
        self._calls: dict[tuple[str, str, str], BoundSeries] = {}
        #: Increments (a BoundSeries and an amount) and finished calls (a CallRecord), in order.
        self._queued: deque[tuple[BoundSeries, int] | CallRecord] = deque()
        #: The event loop a batch is scheduled on, None when none is.
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def add_hook(self, hook: CounterHook, *, names: Collection[str] | None = None) -> None:
        """Follow every increment from now on (a Prometheus exporter, a test); with
        ``names``, those series' only (the hook is then not called for the others)."""
        self.flush()
        self._hooks.append(hook)
        self._hook_names.append(None if names is None else frozenset(names))
        self._hooks_of = {}

    def add_call_hook(self, hook: CallHook) -> None:
        """Follow every finished call from now on (latency histograms, recent-call windows)."""
        self.flush()
        self._call_hooks.append(hook)

    def record_call(self, record: CallRecord) -> None:
        """Count a finished call in ``calls_total`` and hand it to the call hooks."""
        self._queued.append(record)
        self._soon()

    def bound(self, name: str, **labels: str) -> BoundSeries:
        """Series ``name`` with ``labels``, resolved once, for :meth:`add` (a hot counter)."""
        return BoundSeries(key=(name, tuple(sorted(labels.items()))), labels=labels)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to series ``name`` with ``labels``."""
        self.add(BoundSeries(key=(name, tuple(sorted(labels.items()))), labels=labels), amount)

    def add(self, series: BoundSeries, amount: int = 1) -> None:
        """Add ``amount`` to a series from :meth:`bound`."""
        self._queued.append((series, amount))
        self._soon()

    def _soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a blocking caller (the sync adapter): nothing to wait for
            self.flush()
            return
        if self._flush_loop is loop:
            if len(self._queued) >= MAX_QUEUED:  # the loop is not getting to it: do it now
                self.flush()
            return
        self._flush_loop = loop
        loop.call_later(FLUSH_DELAY_S, self.flush)

    def flush(self) -> None:
        """Apply everything queued: counters first, then the hooks, in the order it happened."""
        self._flush_loop = None
        queued = self._queued
        if not queued:
            return
        with self._lock:
            batch: list[tuple[BoundSeries, int, CallRecord | None]] = []
            counters, calls = self._counters, self._calls
            while queued:
                item = queued.popleft()
                if isinstance(item, CallRecord):
                    call_key = (item.target, item.method, item.code)
                    series = calls.get(call_key)
                    if series is None:
                        series = self.bound(
                            CALLS, target=item.target, method=item.method, code=item.code
                        )
                        if len(calls) < MAX_BOUND_SERIES:
                            calls[call_key] = series
                    counters[series.key] += 1
                    batch.append((series, 1, item))
                else:
                    counters[item[0].key] += item[1]
                    batch.append((item[0], item[1], None))
        hooks_of, call_hooks = self._hooks_of, self._call_hooks
        for series, amount, record in batch:
            name = series.key[0]
            hooks = hooks_of.get(name)
            if hooks is None:
                hooks = hooks_of[name] = tuple(
                    hook
                    for hook, names in zip(self._hooks, self._hook_names, strict=True)
                    if names is None or name in names
                )
            for hook in hooks:
                hook(name, series.labels, amount)
            if record is not None:
                for call_hook in call_hooks:
                    call_hook(record)

    def value(self, name: str, **labels: str) -> int:
        """Sum of the series ``name`` whose labels include ``labels``."""
        self.flush()
        wanted = set(labels.items())
        with self._lock:
            return sum(
                count
                for (series, series_labels), count in self._counters.items()
                if series == name and wanted <= set(series_labels)
            )

    def snapshot(self) -> dict[str, dict[Labels, int]]:
        """Every series, by name then labels."""
        self.flush()
        out: dict[str, dict[Labels, int]] = {}
        with self._lock:
            for (name, labels), count in self._counters.items():
                out.setdefault(name, {})[labels] = count
        return out
