"""Tracing of one service: its OpenTelemetry tracer provider, configured by the OTEL_* variables.

Spans are always made (log lines and downstream calls carry the trace id) but exported only
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set: OTLP
over gRPC, batched. With nothing to send spans to, they are sampled out: ids and propagation
without the cost of recording. Each service has a provider of its own whose ``service.name``
is its mesh name, so services sharing one (test) process still report as themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

#: Where spans go; the per-signal variable wins over the general one, as the spec says.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSECURE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")


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


def records_spans(
    environ: Mapping[str, str], *, span_processors: Sequence[SpanProcessor] = ()
) -> bool:
    """Whether anyone receives this service's spans (an exporter, a processor, a sampler).

    A recorded span costs about three dropped ones; record only what someone receives. A
    dropped span still has valid ids, so logs and downstream calls carry the trace id.
    """
    return (
        export_endpoint(environ) is not None
        or bool(span_processors)
        or "OTEL_TRACES_SAMPLER" in environ
    )


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
        # None: the SDK's default, ParentBased(ALWAYS_ON) or what OTEL_TRACES_SAMPLER says.
        sampler=None if recorded else ALWAYS_OFF,
        shutdown_on_exit=False,
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in span_processors:
        provider.add_span_processor(processor)
    return provider


def log_format(service: str) -> str:
    """The one log line format: time, service, level, logger, trace id, message."""
    return f"%(asctime)s {service} %(levelname)s %(name)s trace_id=%(trace_id)s: %(message)s"


class TraceIdFilter(logging.Filter):
    """Sets ``record.trace_id``: the current span's trace id in hex, or ``-`` outside a trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        return True
