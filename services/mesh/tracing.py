"""Tracing of one service: its tracer provider and server-side tracing, from the OTEL_* variables.

Spans are exported only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is
set: OTLP over gRPC, batched, for a sampled share of new traces (parent-based trace-id ratio,
:data:`DEFAULT_SAMPLE_RATIO` unless ``OTEL_TRACES_SAMPLER[_ARG]`` say otherwise). With nothing to
send spans to, or for a call its caller did not sample, no span is made on the server: the
incoming trace context (or a fresh trace id) is only made current, so log lines and downstream
calls still carry the trace id. Each service has a provider whose ``service.name`` is its name.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from interceptors.tracing import server_interceptor
from services.mesh.server import Continuation, TraceContextOf

#: Where spans go; the per-signal variable wins over the general one, as the spec says.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSECURE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
#: The standard variables choosing the sampler and its argument (the ratio).
SAMPLER_VAR, SAMPLER_ARG_VAR = "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"
#: The sampler when ``OTEL_TRACES_SAMPLER`` is unset: a sampled caller's trace is always
#: continued, a new trace is recorded with probability ``OTEL_TRACES_SAMPLER_ARG``.
DEFAULT_SAMPLER = "parentbased_traceidratio"
#: Share of new traces recorded by default. Recording and exporting a call's spans costs
#: ~340 us of client CPU against ~200 us sampled out (measured for issue 11): at 1 % the
#: exporter's share is ~1.4 us per call on average, and at 200 payments/s it still sends two
#: whole payments a second, enough to see every path within a minute. A sampled caller's
#: trace is always continued. ``OTEL_TRACES_SAMPLER_ARG=1`` records everything (development).
DEFAULT_SAMPLE_RATIO = 0.01

#: Samplers by their ``OTEL_TRACES_SAMPLER`` name; the ratio applies to the ``traceidratio`` ones.
_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_always_on": lambda _: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda _: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}


def _first(environ: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def export_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint spans go to, or None when the environment exports nothing.

    ``OTEL_TRACES_EXPORTER=none`` and ``OTEL_SDK_DISABLED=true`` turn export off even with
    an endpoint.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return _first(environ, ENDPOINT_VARIABLES)


def span_exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP exporter the environment asks for, or None (the default: nothing exported).

    Headers, timeout, compression and certificates are read by the exporter itself.
    """
    endpoint = export_endpoint(environ)
    if endpoint is None:
        return None
    insecure = _first(environ, INSECURE_VARIABLES)
    # Unset, the exporter decides from the scheme: http:// is plaintext, https:// is TLS.
    return OTLPSpanExporter(
        endpoint=endpoint, insecure=None if insecure is None else insecure.lower() == "true"
    )


def sampler(environ: Mapping[str, str]) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` name, by default
    ``ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))``.

    Raises:
        ValueError: an unknown sampler, or a ratio that is not a number from 0 to 1 (the SDK
            would fall back silently; a mistyped setting should stop start-up instead).
    """
    name = environ.get(SAMPLER_VAR, "").strip().lower() or DEFAULT_SAMPLER
    make = _SAMPLERS.get(name)
    if make is None:
        raise ValueError(
            f"{SAMPLER_VAR}={environ[SAMPLER_VAR]!r} is not one of {', '.join(_SAMPLERS)}"
        )
    raw = environ.get(SAMPLER_ARG_VAR, "").strip()
    if not raw or "traceidratio" not in name:
        return make(DEFAULT_SAMPLE_RATIO)
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:  # also refuses nan
        raise ValueError(
            f"{SAMPLER_ARG_VAR}={raw!r} is not a ratio from 0 to 1 "
            f"(default {DEFAULT_SAMPLE_RATIO:g} for {name})"
        )
    return make(ratio)


def records_spans(
    environ: Mapping[str, str], *, span_processors: Sequence[SpanProcessor] = ()
) -> bool:
    """Whether anyone receives this service's spans (an exporter, a processor).

    A recorded span costs about three dropped ones, and a dropped one still costs its ids and
    context switching: when nobody receives spans none is made (see :func:`server_tracing`).
    """
    return export_endpoint(environ) is not None or bool(span_processors)


def service_tracer_provider(
    name: str, environ: Mapping[str, str], *, span_processors: Sequence[SpanProcessor] = ()
) -> TracerProvider:
    """The tracer provider of service ``name``; shut it down when the service stops.

    Args:
        name: Mesh name of the service, its ``service.name``.
        environ: The service's environment (``OTEL_*`` variables).
        span_processors: Processors to add (a test's in-memory exporter).
    """
    exporter = span_exporter(environ)
    recorded = records_spans(environ, span_processors=span_processors)
    provider = TracerProvider(
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES; the mesh name wins.
        resource=Resource.create({SERVICE_NAME: name}),
        # Read from the service's environment, not the process's (test services share one).
        sampler=sampler(environ) if recorded else ALWAYS_OFF,
        shutdown_on_exit=False,
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in span_processors:
        provider.add_span_processor(processor)
    return provider


#: gRPC's invocation metadata: (key, value) pairs, binary values under ``-bin`` keys.
Metadata = Collection[tuple[str, str | bytes]]


class _MetadataGetter:
    """Reads propagation fields from gRPC's invocation metadata."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def _extracted(metadata: Metadata | None) -> tuple[otel_context.Context, SpanContext]:
    """The context the configured propagators read from ``metadata``, and its span's ids."""
    # From an empty context, not the current one: a call starts a context of its own (and the
    # current one may be an IncomingContext being read).
    incoming = propagate.extract(metadata or (), otel_context.Context(), getter=_GETTER)  # type: ignore[arg-type]  # pairs, read by _GETTER
    return incoming, trace.get_current_span(incoming).get_span_context()


def incoming_trace(metadata: Metadata | None) -> otel_context.Context:
    """The caller's trace context (its ``traceparent``), or a fresh, unsampled trace id when it
    sent none or a malformed one: what a server that makes no span makes current.

    Log lines then carry the trace id and downstream calls continue the caller's trace (same id
    and sampled flag), for the cost of parsing one header instead of a span per call.
    """
    incoming, span_context = _extracted(metadata)
    if span_context.is_valid:
        return incoming
    return _fresh_trace()


def _fresh_trace() -> otel_context.Context:
    """A new, unsampled trace id (no span is made for it)."""
    span_context = SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), otel_context.Context())


def unsampled_trace(metadata: Metadata | None) -> otel_context.Context | None:
    """The caller's trace context when its ``traceparent`` is valid and not sampled, else None.

    Under a parent-based sampler nothing of such a call is recorded, so its server needs no span.
    """
    incoming, span_context = _extracted(metadata)
    return incoming if span_context.is_valid and not span_context.trace_flags.sampled else None


#: A version-00 ``traceparent``: trace id, parent span id, flags (W3C Trace Context).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: Headers only the propagators read correctly (trace state, baggage): they take over.
_PROPAGATOR_ONLY = frozenset({"tracestate", "baggage"})
#: The fields of the default propagators (W3C trace context and baggage, or the first alone).
_W3C_FIELDS = ({"traceparent", "tracestate", "baggage"}, {"traceparent", "tracestate"})


def _traceparent(metadata: Metadata | None) -> tuple[SpanContext | None, bool]:
    """The caller's span context from a plain version-00 ``traceparent`` (None: none sent, or
    zero ids), and whether the propagators must decide instead (trace state, baggage, another
    version, a malformed or repeated header): what they would give, for a fifth of the cost."""
    header: str | bytes | None = None
    for key, value in metadata or ():
        if key == "traceparent":
            if header is not None:
                return None, True
            header = value
        elif key in _PROPAGATOR_ONLY:
            return None, True
    if header is None:
        return None, False
    match = _TRACEPARENT.fullmatch(header) if isinstance(header, str) else None
    if match is None:
        return None, True
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not (trace_id and span_id):
        return None, False
    flags = TraceFlags(int(match[3], 16))
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags), False


def _remote(span_context: SpanContext) -> otel_context.Context:
    """A context whose current span is the caller's (what extraction gives)."""
    return trace.set_span_in_context(NonRecordingSpan(span_context), otel_context.Context())


def _w3c_incoming_trace(metadata: Metadata | None) -> otel_context.Context:
    """:func:`incoming_trace` when the propagators are the default W3C ones."""
    span_context, generic = _traceparent(metadata)
    if generic:
        return incoming_trace(metadata)
    return _fresh_trace() if span_context is None else _remote(span_context)


def _w3c_unsampled_trace(metadata: Metadata | None) -> otel_context.Context | None:
    """:func:`unsampled_trace` when the propagators are the default W3C ones."""
    span_context, generic = _traceparent(metadata)
    if generic:
        return unsampled_trace(metadata)
    if span_context is None or span_context.trace_flags.sampled:
        return None
    return _remote(span_context)


class IncomingContext(otel_context.Context):
    """The context a call is served in when no span is made: the caller's trace, read from its
    metadata only when something asks (a log line's trace id, a downstream call's
    ``traceparent``, a span made under it), so a call that needs neither parses nothing.

    Read once, then an ordinary context: what :func:`incoming_trace` would have given.
    """

    def __init__(
        self,
        metadata: Metadata | None,
        read: Callable[[Metadata | None], otel_context.Context] = incoming_trace,
    ) -> None:
        super().__init__()
        self._pending: tuple[Metadata | None, Callable[..., otel_context.Context]] | None = (
            metadata,
            read,
        )

    def _read(self) -> None:
        pending = self._pending
        if pending is None:
            return
        metadata, read = pending
        for key, value in read(metadata).items():
            dict.setdefault(self, key, value)  # a racing reader's values win; both agree then
        self._pending = None

    def get(self, key: str, default: Any = None) -> Any:
        self._read()
        return dict.get(self, key, default)

    def __getitem__(self, key: str) -> object:
        self._read()
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self._read()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._read()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._read()
        return dict.__len__(self)

    def __eq__(self, other: object) -> bool:
        self._read()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]  # a dict: unhashable

    def __repr__(self) -> str:
        self._read()
        return dict.__repr__(self)

    def keys(self) -> Any:
        self._read()
        return dict.keys(self)

    def values(self) -> Any:
        self._read()
        return dict.values(self)

    def items(self) -> Any:
        self._read()
        return dict.items(self)

    def copy(self) -> dict[str, object]:
        self._read()
        return dict.copy(self)


def _w3c_propagation() -> bool:
    """Whether the configured propagators are the default W3C ones (``OTEL_PROPAGATORS``)."""
    return set(propagate.get_global_textmap().fields) in _W3C_FIELDS


class _SampledCallsOnly(aio.ServerInterceptor):
    """The instrumentation's interceptor for the calls that may be recorded; a call whose
    caller did not sample it passes by without a span (the policy interceptor then makes
    :func:`unsampled_trace` current)."""

    def __init__(self, traced: aio.ServerInterceptor, unsampled: TraceContextOf) -> None:
        self._traced = traced
        self._unsampled = unsampled

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self._unsampled(handler_call_details.invocation_metadata) is not None:
            return await continuation(handler_call_details)
        return await self._traced.intercept_service(continuation, handler_call_details)


def server_tracing(
    provider: TracerProvider, *, recording: bool
) -> tuple[list[aio.ServerInterceptor], TraceContextOf | None]:
    """The server's tracing: the interceptors to put first, and the trace step for the policy
    interceptor (``ServerPolicyInterceptor(trace_context=...)``).

    When nobody receives spans: no interceptor (a layer costs an await per call) and the policy
    interceptor makes :func:`incoming_trace` current, read when first needed
    (:class:`IncomingContext`). When someone does, the instrumentation
    makes a SERVER span per call; under a parent-based sampler (every ``parentbased_*``, the
    default) only for calls the caller did not mark unsampled, as those are never recorded.
    """
    w3c = _w3c_propagation()  # the common case reads traceparent itself, not through propagate
    if not recording:
        read = _w3c_incoming_trace if w3c else incoming_trace
        return [], lambda metadata: IncomingContext(metadata, read)
    traced = server_interceptor(provider)
    if isinstance(provider.sampler, ParentBased):
        unsampled = _w3c_unsampled_trace if w3c else unsampled_trace
        return [_SampledCallsOnly(traced, unsampled)], unsampled
    return [traced], None


def log_format(service: str) -> str:
    """The one log line format: time, service, level, logger, trace id, message."""
    return f"%(asctime)s {service} %(levelname)s %(name)s trace_id=%(trace_id)s: %(message)s"


class TraceIdFilter(logging.Filter):
    """Sets ``record.trace_id``: the current span's trace id in hex, or ``-`` outside a trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        return True
