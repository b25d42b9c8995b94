"""The trace context a server call is served in without a span: read from ``traceparent`` only
when asked, and the same as the propagators' reading."""

from __future__ import annotations

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

from services.mesh import tracing
from services.mesh.tracing import IncomingContext, incoming_trace

TRACE_ID, SPAN_ID = 0xAB * (2**120 // 0xFF), 0xCD
TRACEPARENT = ("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01")


def _span_of(context: otel_context.Context) -> trace.SpanContext:
    return trace.get_current_span(context).get_span_context()


def _reading(context: otel_context.Context) -> tuple[object, ...]:
    span = _span_of(context)
    return (
        sorted(context),
        (span.trace_id, span.span_id, span.trace_flags, span.is_remote, dict(span.trace_state)),
        dict(baggage.get_all(context)),
    )


def test_nothing_is_read_until_asked_then_the_callers_trace_is_current() -> None:
    reads: list[object] = []

    def read(metadata: object) -> otel_context.Context:
        reads.append(metadata)
        return incoming_trace((TRACEPARENT,))

    context = IncomingContext((TRACEPARENT,), read)
    token = otel_context.attach(context)
    try:
        assert reads == []
        span = trace.get_current_span().get_span_context()
        assert (span.trace_id, span.span_id, span.trace_flags.sampled) == (TRACE_ID, SPAN_ID, True)
        trace.get_current_span()
        assert len(reads) == 1  # once
    finally:
        otel_context.detach(token)


def test_a_context_derived_from_it_keeps_the_callers_trace() -> None:
    derived = baggage.set_baggage("k", "v", IncomingContext((TRACEPARENT,)))

    assert _span_of(derived).trace_id == TRACE_ID
    assert baggage.get_baggage("k", derived) == "v"


def test_the_direct_reading_equals_the_propagators() -> None:
    cases = [
        (TRACEPARENT,),
        (("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-00"), ("user-agent", "grpc")),
        (TRACEPARENT, ("tracestate", "vendor=1")),
        (TRACEPARENT, ("baggage", "k=v")),
        (("traceparent", f"01-{TRACE_ID:032x}-{SPAN_ID:016x}-01-future"),),
    ]
    for metadata in cases:
        direct = tracing._w3c_incoming_trace(metadata)
        assert _reading(direct) == _reading(incoming_trace(metadata)), metadata


def test_a_missing_zero_or_malformed_traceparent_gives_a_fresh_unsampled_trace() -> None:
    for metadata in (
        (),
        (("traceparent", f"00-{0:032x}-{SPAN_ID:016x}-01"),),
        (("traceparent", "00-nonsense"),),
        (("traceparent", b"binary"),),
    ):
        span = _span_of(IncomingContext(metadata, tracing._w3c_incoming_trace))
        assert span.is_valid and not span.trace_flags.sampled, metadata
        assert span.trace_id != TRACE_ID
