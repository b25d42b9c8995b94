"""Prometheus series of one service, served as text at ``GET /metrics`` on its admin port.

Each service has its own ``CollectorRegistry`` (tests run several services in one process).
Server RPCs come from the server interceptor's observers, client call latency from the
chain's call hook; the chain's counters and breaker states are read at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from interceptors import observe
from interceptors.breaker import CLOSED, HALF_OPEN, HALF_OPEN_READY, OPEN
from interceptors.http import route_of
from interceptors.telemetry import CallRecord, ChainTelemetry, Labels
from services.mesh.admin import AdminRequest, AdminResponse

#: Latency buckets in seconds: loopback calls take a millisecond, partner calls up to seconds.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Children of the client latency histogram kept bound, per (target, method); partner
#: methods with ids in the path are many raw methods for one label, so the cache is bounded.
MAX_BOUND_CHILDREN = 4096
#: Value of ``paymesh_breaker_state`` per breaker state; half-open-ready (open, its open time
#: passed, the next call a trial) reads as half-open.
BREAKER_STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, HALF_OPEN_READY: 1, OPEN: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainSeries:
    """How one counter of the chain's telemetry is exported."""

    name: str
    """Prometheus family name without ``_total`` (the client library appends it)."""
    documentation: str
    """HELP text."""
    labels: tuple[str, ...]
    """Telemetry labels exported, in order (``caller`` is prepended to each)."""
    renames: tuple[tuple[str, str], ...] = ()
    """Telemetry label -> Prometheus label, where they differ."""


#: The observer's counter -> its Prometheus family. Counters not listed are not exported.
CHAIN_SERIES: Mapping[str, ChainSeries] = {
    observe.CALLS: ChainSeries(
        name="paymesh_client_rpcs",
        documentation="Outgoing calls by target, method and final code (retries included once).",
        labels=("target", "method", "code"),
    ),
    observe.ATTEMPTS: ChainSeries(
        name="paymesh_client_attempts",
        documentation="Attempts sent to a target (first attempts and retries).",
        labels=("target", "method"),
    ),
    observe.RETRIES: ChainSeries(
        name="paymesh_client_retries",
        documentation="Retries sent to a target, the extra load retries add.",
        labels=("target", "method"),
    ),
    observe.RETRY_STOPS: ChainSeries(
        name="paymesh_client_retry_stops",
        documentation="Calls that failed for good, by the reason the chain stopped retrying.",
        labels=("target", "method", "reason"),
    ),
    observe.BUDGET_EXHAUSTED: ChainSeries(
        name="paymesh_retry_budget_exhausted",
        documentation="Retries refused because the target's retry budget was spent.",
        labels=("target",),
    ),
    observe.BREAKER_TRANSITIONS: ChainSeries(
        name="paymesh_breaker_transitions",
        documentation="Circuit breaker state changes by target.",
        labels=("target", "old", "new"),
        renames=(("old", "from_state"), ("new", "to_state")),
    ),
    observe.BREAKER_REJECTIONS: ChainSeries(
        name="paymesh_breaker_rejections",
        documentation="Calls refused locally because the target's breaker was open.",
        labels=("target",),
    ),
    observe.BREAKER_TRIPS: ChainSeries(
        name="paymesh_breaker_trips",
        documentation="Times a target's breaker opened, by the rule that opened it "
        "(failure_rate, consecutive_failures, slow_call_rate, trial_failed, trial_slow).",
        labels=("target", "rule"),
    ),
    observe.BREAKER_ABORTED: ChainSeries(
        name="paymesh_breaker_aborted_calls",
        documentation="Calls in flight failed at once (CIRCUIT_OPEN) because the target's "
        "breaker opened while they waited.",
        labels=("target",),
    ),
    observe.CONCURRENCY_LIMITED: ChainSeries(
        name="paymesh_client_concurrency_limited",
        documentation="Calls refused locally (CONCURRENCY_LIMITED) because the target had its "
        "limit of calls in flight; not counted by the breaker.",
        labels=("target",),
    ),
    observe.DEADLINE_EXCEEDED: ChainSeries(
        name="paymesh_client_deadline_exceeded",
        documentation="Outgoing calls that ended with DEADLINE_EXCEEDED.",
        labels=("target", "method"),
    ),
    observe.DEADLINE_PROPAGATED: ChainSeries(
        name="paymesh_client_deadline_propagated",
        documentation="Outgoing calls whose deadline was cut to what the incoming call had left.",
        labels=("target", "method"),
    ),
    observe.DEADLINE_EXHAUSTED: ChainSeries(
        name="paymesh_client_deadline_exhausted",
        documentation="Outgoing calls not sent because the incoming deadline was already spent.",
        labels=("target", "method"),
    ),
    observe.TLS_HANDSHAKE_FAILURES: ChainSeries(
        name="paymesh_client_tls_handshake_failures",
        documentation="Outgoing calls whose TLS handshake failed (untrusted, expired or wrong "
        "certificate); never retried, never counted by the breaker.",
        labels=("target",),
    ),
}


def method_label(method: str) -> str:
    """Bounded ``method`` label: a partner call's query and id-like path segments go.

    ``GET /lookup?ip=1.2.3.4`` becomes ``GET /lookup``; ``POST /charges/ch_42/refunds``
    becomes ``POST /charges/:id/refunds``. gRPC method names are returned unchanged.
    """
    if method.startswith("/"):
        return method
    verb, _, path = method.partition(" ")
    return f"{verb} {route_of(path)}".rstrip()


class ChainCollector(Collector):
    """Reads the chain's counters and breaker states at scrape time."""

    def __init__(
        self,
        *,
        caller: str,
        telemetry: ChainTelemetry,
        breaker_states: Callable[[], Mapping[str, str]],
        targets: Sequence[str],
    ) -> None:
        self._caller = caller
        self._telemetry = telemetry
        self._breaker_states = breaker_states
        self._targets = tuple(targets)

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the families depend on which series exist at scrape time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One family per exported telemetry counter, then the breaker state gauge."""
        snapshot = self._telemetry.snapshot()
        for key, series in CHAIN_SERIES.items():
            family = CounterMetricFamily(
                series.name,
                series.documentation,
                labels=("caller", *(dict(series.renames).get(x, x) for x in series.labels)),
            )
            for values, count in _merge(snapshot.get(key, {}), series.labels).items():
                family.add_metric((self._caller, *values), count)
            yield family
        gauge = GaugeMetricFamily(
            "paymesh_breaker_state",
            "Circuit breaker state of each target: 0 closed, 1 half-open (or open with its open "
            "time passed), 2 open.",
            labels=("caller", "target"),
        )
        states = dict.fromkeys(self._targets, CLOSED) | dict(self._breaker_states())
        for target, state in sorted(states.items()):
            gauge.add_metric((self._caller, target), BREAKER_STATE_VALUES.get(state, 0))
        yield gauge


def _merge(series: Mapping[Labels, int], names: Sequence[str]) -> dict[tuple[str, ...], int]:
    """Counts by the exported labels' values; partner methods that normalise alike add up."""
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for labels, count in series.items():
        values = dict(labels)
        key = tuple(
            method_label(values.get(n, "")) if n == "method" else values.get(n, "") for n in names
        )
        out[key] += count
    return out


class _Latencies:
    """One method's latency histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total_s = 0.0


class ServerCallCollector(Collector):
    """``paymesh_server_rpcs`` and ``paymesh_server_rpc_duration_seconds`` of one service.

    Counted in plain ints and read at scrape time: a prometheus_client child takes a lock per
    increment and per observation, which on every call of a hop cost more than the rest of
    the metrics. One event loop observes, so nothing is lost between its increments.
    """

    def __init__(self, *, service: str) -> None:
        self._service = service
        # Bounded: only served methods reach the observers, and there are 17 codes.
        self._calls: dict[tuple[str, grpc.StatusCode], int] = {}
        self._latencies: dict[str, _Latencies] = {}

    def observe(self, method: str, code: grpc.StatusCode, elapsed_s: float) -> None:
        """Count one call of ``method`` that ended with ``code`` after ``elapsed_s``."""
        key = (method, code)
        self._calls[key] = self._calls.get(key, 0) + 1
        latencies = self._latencies.get(method)
        if latencies is None:
            latencies = self._latencies[method] = _Latencies()
        # Bucket ``le`` counts what took at most its bound: the first bound >= elapsed.
        latencies.counts[bisect_left(LATENCY_BUCKETS_S, elapsed_s)] += 1
        latencies.total_s += elapsed_s

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the families are made at scrape time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The counter by service, method and code; the histogram by service and method."""
        calls = CounterMetricFamily(
            "paymesh_server_rpcs",
            "Incoming RPCs by service, method and code.",
            labels=("service", "method", "code"),
        )
        for (method, code), count in sorted(self._calls.items(), key=lambda i: i[0][0]):
            calls.add_metric((self._service, method, code.name), count)
        yield calls
        durations = HistogramMetricFamily(
            "paymesh_server_rpc_duration_seconds",
            "Time to answer an incoming RPC.",
            labels=("service", "method"),
        )
        bounds = [*(str(float(b)) for b in LATENCY_BUCKETS_S), "+Inf"]  # as prometheus_client
        for method, latencies in sorted(self._latencies.items()):
            cumulative = list(accumulate(latencies.counts))
            durations.add_metric(
                (self._service, method),
                list(zip(bounds, cumulative, strict=True)),
                latencies.total_s,
            )
        yield durations


class FlushingRegistry(CollectorRegistry):
    """A registry that first applies what its sources queued (the chain's counters and
    finished calls reach their hooks in batches: ``ChainTelemetry.flush``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[Callable[[], None]] = []

    def collect(self) -> Iterator[Metric]:
        for flush in self.sources:
            flush()
        yield from super().collect()


class ServiceMetrics:
    """The registry of one service and the hooks that feed it."""

    def __init__(self, *, service: str) -> None:
        self.service = service
        self.registry = FlushingRegistry()
        self.server_calls = ServerCallCollector(service=service)
        self.registry.register(self.server_calls)
        self.server_shed = Counter(
            "paymesh_server_shed",
            "Incoming RPCs refused at once because the service was at its concurrency cap.",
            ("service", "method"),
            registry=self.registry,
        )
        self.client_latency = Histogram(
            "paymesh_client_rpc_duration_seconds",
            "Time an outgoing call took as its caller saw it (retries and backoff included).",
            ("caller", "target", "method"),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        #: ``client_latency``'s child per (target, raw method), bound on first use.
        self._client_children: dict[tuple[str, str], Any] = {}

    def observe_server(self, method: str, code: grpc.StatusCode, elapsed_s: float) -> None:
        """A ``ServerPolicyInterceptor`` observer: count and time one incoming RPC."""
        self.server_calls.observe(method, code, elapsed_s)

    def count_shed(self, method: str) -> None:
        """A ``ServerPolicyInterceptor`` hook: one call refused for the concurrency cap."""
        self.server_shed.labels(self.service, method).inc()

    def observe_client(self, record: CallRecord) -> None:
        """A ``ChainTelemetry`` call hook: time one outgoing call."""
        key = (record.target, record.method)
        child = self._client_children.get(key)
        if child is None:  # once per edge and method: the label lookup costs more than observe
            method = method_label(record.method)
            child = self.client_latency.labels(self.service, record.target, method)
            if len(self._client_children) < MAX_BOUND_CHILDREN:
                self._client_children[key] = child
        child.observe(record.duration_s)

    def follow_chain(
        self,
        telemetry: ChainTelemetry,
        breaker_states: Callable[[], Mapping[str, str]],
        targets: Sequence[str],
    ) -> None:
        """Export the chain's counters and breaker states, and time its calls."""
        telemetry.add_call_hook(self.observe_client)
        self.registry.sources.append(telemetry.flush)
        self.registry.register(
            ChainCollector(
                caller=self.service,
                telemetry=telemetry,
                breaker_states=breaker_states,
                targets=targets,
            )
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry)

    def handle(self, request: AdminRequest) -> AdminResponse:
        """``GET /metrics``."""
        return AdminResponse(200, self.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
