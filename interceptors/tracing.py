"""Tracing of the chain and the servers: OpenTelemetry spans for calls, attempts and handlers.

opentelemetry-instrumentation-grpc makes the CLIENT span of every call (outermost in the
chain) and the SERVER span of every handled call (the server's first interceptor). The attempt
loop's observer opens one CLIENT child span per attempt, whose context (``traceparent``) the
attempt carries, so a downstream's server span hangs under the attempt that reached it. Only
the OpenTelemetry API at import (the instrumentation is imported where it is used):
services.mesh.tracing configures the SDK.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:  # the gRPC instrumentation is imported where it is used: the core has no gRPC
    from grpc import aio

#: Attempt number of an attempt span, 1 for the first.
ATTEMPT_ATTRIBUTE = "paymesh.attempt"
#: Mesh name of the service or partner a span's call goes to.
TARGET_ATTRIBUTE = "paymesh.target"
#: Attempts a call made in all, set on the call's span when it made more than one or failed.
ATTEMPTS_ATTRIBUTE = "paymesh.attempts"
#: Why the chain stopped retrying a failed call (``attempts``, ``budget``, ``deadline``, ...).
STOP_REASON_ATTRIBUTE = "paymesh.stop_reason"
#: Event on the attempt span when the target's breaker refused the attempt.
CIRCUIT_OPEN_EVENT = "circuit_open"
#: Seconds until an open breaker lets a trial call through, on the ``circuit_open`` event.
RETRY_AFTER_ATTRIBUTE = "paymesh.retry_after_s"
#: The W3C trace context field every call carries when it has a trace.
TRACEPARENT = "traceparent"
#: OpenTelemetry semantic convention: gRPC status code of a call or attempt.
GRPC_STATUS_ATTRIBUTE = "rpc.grpc.status_code"


class _MetadataSetter(Setter[Any]):
    """Writes propagation fields into aio metadata or an HTTP header dict alike."""

    def set(self, carrier: Any, key: str, value: str) -> None:
        carrier[key] = value


_SETTER = _MetadataSetter()


def client_interceptors(
    tracer_provider: trace.TracerProvider | None,
) -> tuple[aio.UnaryUnaryClientInterceptor, aio.UnaryStreamClientInterceptor]:
    """The instrumentation's unary-unary and unary-stream client interceptors."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    # The instrumentation ships untyped; it returns the four aio interceptors in this order.
    unary_unary, unary_stream, *_ = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider
    )
    return unary_unary, unary_stream


def server_interceptor(tracer_provider: trace.TracerProvider | None) -> aio.ServerInterceptor:
    """The instrumentation's server interceptor; put it first, before the policy interceptor.

    Health and reflection calls (probes, ``buf curl``) are not traced: they would drown the
    traces that matter.
    """
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import negate, service_prefix

    # The instrumentation ships untyped.
    interceptor: aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=negate(service_prefix("grpc."))
    )
    return interceptor


def skips_unsampled(tracer: Tracer) -> bool:
    """Whether ``tracer`` samples parent-based (every ``parentbased_*`` sampler, the default):
    then nothing below an unsampled parent is ever recorded, so the chain makes no span there."""
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError:  # the API alone: its tracers record nothing anyway
        return False
    return isinstance(getattr(tracer, "sampler", None), ParentBased)


def recorded_under(parent: trace.Span) -> bool:
    """Whether a parent-based sampler may record a child of ``parent``: it is sampled, or there is
    none (a new trace, which the sampler's root rule decides)."""
    context = parent.get_span_context()
    return not context.is_valid or context.trace_flags.sampled


def propagation_fields() -> frozenset[str]:
    """Metadata keys the configured propagators write (``traceparent``, ``tracestate``, ...)."""
    return frozenset(propagate.get_global_textmap().fields)


def inject(carrier: MutableMapping[str, str] | aio.Metadata, context: Context) -> None:
    """Write ``context``'s trace into ``carrier`` (aio metadata or HTTP headers)."""
    propagate.inject(carrier, context=context, setter=_SETTER)


def _w3c_default(textmap: object) -> bool:
    """Whether ``textmap`` is OpenTelemetry's default: W3C trace context, then W3C baggage."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not isinstance(textmap, CompositePropagator):
        return False
    kinds = [type(p) for p in getattr(textmap, "_propagators", ())]
    return kinds == [TraceContextTextMapPropagator, W3CBaggagePropagator]


def _only_key(made: Context) -> str:
    """The one key of a context made from an empty one: where the API keeps that value."""
    (key,) = made.keys()
    return key


#: Where a context keeps its span and its baggage, learnt from the API itself once.
_SPAN_KEY = _only_key(trace.set_span_in_context(trace.INVALID_SPAN, Context()))
_BAGGAGE_KEY = _only_key(baggage.set_baggage("paymesh", "key", context=Context()))


class TraceFields:
    """What :func:`inject` writes for a context, made directly in the common case: the
    default W3C propagators and a trace that carries nothing but its ``traceparent`` (no
    ``tracestate``, no baggage). Anything else goes through the propagators as configured.
    The fields of the last context seen are kept: calls made in one context (a handler's
    several calls, a call's retries) reuse them."""

    __slots__ = ("_context", "_default", "_fields")

    def __init__(self) -> None:
        self._default: object = None  # the global textmap, once seen to be the default one
        self._context: Context | None = None  # the last context made directly, and
        self._fields: tuple[tuple[str, str], ...] = ()  # what it writes

    def fields(self, context: Context) -> tuple[tuple[str, str], ...]:
        """The (key, value) pairs :func:`inject` writes for ``context``, in its order."""
        textmap = propagate.get_global_textmap()
        if textmap is self._default and context is self._context:
            return self._fields
        if textmap is not self._default:
            if not _w3c_default(textmap):
                return self._propagated(context)
            self._default = textmap
        if context.get(_BAGGAGE_KEY):
            return self._propagated(context)
        span = cast("trace.Span | None", context.get(_SPAN_KEY))
        fields: tuple[tuple[str, str], ...] = ()
        if span is not None:
            span_context = span.get_span_context()
            if span_context.trace_state:
                return self._propagated(context)
            if span_context.is_valid:
                fields = (
                    (
                        TRACEPARENT,
                        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
                        f"-{span_context.trace_flags:02x}",
                    ),
                )
        self._context, self._fields = context, fields
        return fields

    @staticmethod
    def _propagated(context: Context) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        inject(carrier, context)
        return tuple(carrier.items())

    def inject(self, carrier: MutableMapping[str, str] | aio.Metadata, context: Context) -> None:
        """:func:`inject`, with the same result."""
        for key, value in self.fields(context):
            carrier[key] = value


def start_attempt(
    tracer: Tracer,
    name: str,
    *,
    target: str,
    attempt: int,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> trace.Span:
    """A CLIENT span for one attempt, child of the current (call) span; the caller ends it."""
    fields: dict[str, AttributeValue] = {TARGET_ATTRIBUTE: target, ATTEMPT_ATTRIBUTE: attempt}
    if attributes:
        fields.update(attributes)
    return tracer.start_span(
        name,
        kind=SpanKind.CLIENT,
        attributes=fields,
        record_exception=False,
        set_status_on_exception=False,
    )


def fail_span(span: trace.Span, code: str, description: str, code_value: int | None) -> None:
    """Mark ``span`` failed with gRPC code name ``code`` (and its number when known)."""
    if code_value is not None:
        span.set_attribute(GRPC_STATUS_ATTRIBUTE, code_value)
    span.set_status(Status(StatusCode.ERROR, f"{code}: {description}"))


def circuit_open(span: trace.Span, *, target: str, retry_after_s: float) -> None:
    """Record on ``span`` that the breaker of ``target`` refused the call."""
    span.add_event(
        CIRCUIT_OPEN_EVENT, {TARGET_ATTRIBUTE: target, RETRY_AFTER_ATTRIBUTE: retry_after_s}
    )


def stopped(span: trace.Span, *, attempts: int, reason: str | None = None) -> None:
    """Note on the call's ``span`` how many attempts it took and why retrying stopped."""
    span.set_attribute(ATTEMPTS_ATTRIBUTE, attempts)
    if reason is not None:
        span.set_attribute(STOP_REASON_ATTRIBUTE, reason)
