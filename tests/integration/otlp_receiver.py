"""An OTLP/gRPC trace receiver for tests: the collector's TraceService, keeping every span.

Built on the official ``opentelemetry-proto`` messages and service, so the services' stock
OTLP exporter talks to it exactly as to Jaeger or an OpenTelemetry Collector; each span is
kept with its resource's ``service.name`` and its ids in hex, as the W3C ``traceparent`` has them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

#: OTLP's span kinds by the names the SDK gives them.
KIND_NAMES = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "int_value", "bool_value") else None


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as the receiver got it."""

    service: str
    """``service.name`` of the span's resource."""
    name: str
    kind: str
    """``SERVER``, ``CLIENT``, ..."""
    trace_id: str
    span_id: str
    parent_id: str
    """Span id of the parent, empty for a root."""
    attributes: dict[str, Any] = field(default_factory=dict)


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's OTLP/gRPC trace endpoint, keeping what it receives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received += [
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        kind=KIND_NAMES.get(span.kind, "UNSPECIFIED"),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                    )
                    for span in scope_spans.spans
                ]
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        """Every span received so far, or those of trace ``trace_id`` (hex)."""
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]


@contextlib.contextmanager
def running_receiver() -> Iterator[tuple[str, TraceReceiver]]:
    """A receiver on 127.0.0.1; yields its ``http://`` endpoint (plaintext) and itself."""
    # A thread-pool server: a service flushes its spans synchronously while stopping, which
    # would block a receiver sharing the test's event loop.
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # opentelemetry-proto ships no type hints for its generated grpc module.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(None)
