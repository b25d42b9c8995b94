"""The untraced unary path of the client factory's channels (stub -> attempt loop, no call
details), against a real server: it retries and propagates the trace and the deadline as the
traced path does (its breaker refusals: test_chain_aio, whose stubs take this path)."""

from __future__ import annotations

import random

import grpc
from grpc import aio
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.tracing import TraceFields, inject
from paymesh.testing.v1 import testing_pb2 as pb
from tests.integration.harness import Fault, make_chain, serving, stub_for

UNAVAILABLE = Fault(code=grpc.StatusCode.UNAVAILABLE)
CLOCK_SKEW_S = 0.05


def _handler_context(
    *, sampled: bool = False, trace_state: TraceState | None = None
) -> otel_context.Context:
    """A context as a handler has it: the incoming call's span, recorded or not."""
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span_context = SpanContext(
        random.getrandbits(128) or 1, random.getrandbits(64) or 1, True, flags, trace_state
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def _traceparent(context: otel_context.Context) -> str:
    carrier: dict[str, str] = {}
    inject(carrier, context)
    return carrier["traceparent"]


async def test_a_retry_follows_an_unavailable_first_attempt_with_the_same_traceparent() -> None:
    context = _handler_context()
    async with serving() as srv:
        srv.servicer.fail("Read", UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            token = otel_context.attach(context)
            try:
                response = await stub.Read(pb.ReadRequest(text="hi"))
            finally:
                otel_context.detach(token)
    assert (response.text, response.attempt) == ("hi", 2)
    expected = _traceparent(context)
    assert [a.metadata.get("traceparent") for a in srv.servicer.attempts] == [expected] * 2
    assert [a.metadata.get("grpc-previous-rpc-attempts") for a in srv.servicer.attempts] == [
        None,
        "1",
    ]


async def test_callers_metadata_is_sent_and_its_stale_trace_fields_replaced() -> None:
    context = _handler_context()
    stale = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("x-caller", "kept")]
    async with serving() as srv, stub_for(make_chain(), srv.address) as stub:
        token = otel_context.attach(context)
        try:
            await stub.Read(pb.ReadRequest(), metadata=stale)
            await stub.Read(pb.ReadRequest(), metadata=aio.Metadata(*stale))
        finally:
            otel_context.detach(token)
    for attempt in srv.servicer.attempts:
        assert attempt.metadata.get("x-caller") == "kept"
        assert attempt.metadata.get("traceparent") == _traceparent(context)


async def test_a_call_outside_any_trace_sends_no_trace_fields() -> None:
    async with serving() as srv, stub_for(make_chain(), srv.address) as stub:
        await stub.Read(pb.ReadRequest())
    assert "traceparent" not in srv.servicer.attempts[0].metadata


async def test_tracestate_and_baggage_still_go_through_the_configured_propagators() -> None:
    context = baggage.set_baggage(
        "tenant", "m-1", _handler_context(trace_state=TraceState([("vendor", "v1")]))
    )
    async with serving() as srv, stub_for(make_chain(), srv.address) as stub:
        token = otel_context.attach(context)
        try:
            await stub.Read(pb.ReadRequest())
        finally:
            otel_context.detach(token)
    sent = srv.servicer.attempts[0].metadata
    assert sent.get("tracestate") == "vendor=v1"
    assert sent.get("baggage") == "tenant=m-1"
    assert sent.get("traceparent") == _traceparent(context)


async def test_the_incoming_deadline_still_bounds_the_call() -> None:
    async with serving() as srv, stub_for(make_chain({"timeout_s": 5.0}), srv.address) as stub:
        token = set_incoming_deadline(0.5)
        try:
            await stub.Read(pb.ReadRequest())
        finally:
            reset_incoming_deadline(token)
    remaining = srv.servicer.attempts[0].time_remaining
    assert remaining is not None and remaining <= 0.5 + CLOCK_SKEW_S


def test_trace_fields_write_what_the_propagators_write() -> None:
    fields = TraceFields()
    plain = _handler_context()
    cases = [
        plain,
        _handler_context(sampled=True),
        baggage.set_baggage("k", "v", plain),
        _handler_context(trace_state=TraceState([("a", "b")])),
        trace.set_span_in_context(trace.INVALID_SPAN),
        otel_context.Context(),
    ]
    for context in cases:
        expected, written = aio.Metadata(("x", "y")), aio.Metadata(("x", "y"))
        inject(expected, context)
        fields.inject(written, context)
        assert list(written) == list(expected)
