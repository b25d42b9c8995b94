"""In-process counters of the client chain, the seed of its Prometheus series.

Every layer reports here (attempts, retries, stop reasons, budget exhaustion, breaker
transitions, deadlines exceeded and propagated); hooks let a metrics exporter or a tracer
follow each increment later. No gRPC import.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping

Labels = tuple[tuple[str, str], ...]
#: Called on each increment with (series name, labels, amount).
CounterHook = Callable[[str, Mapping[str, str], int], None]


class ChainTelemetry:
    """Counters by series name and labels; thread-safe."""

    def __init__(self, *, caller: str, hooks: tuple[CounterHook, ...] = ()) -> None:
        self.caller = caller
        self._hooks = list(hooks)
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, Labels]] = Counter()

    def add_hook(self, hook: CounterHook) -> None:
        """Follow every increment from now on (a Prometheus exporter, a test)."""
        self._hooks.append(hook)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to series ``name`` with ``labels``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += amount
        for hook in self._hooks:
            hook(name, labels, amount)

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
