"""Tracing across the mesh: one payment is one trace over every service it touched.

The services run in-process through the real bootstrap, each with its own tracer provider
(``service.name`` = its mesh name) feeding one in-memory exporter; spans cross the real gRPC
and HTTP wire, linked by the ``traceparent`` each attempt carries. The chain's own spans
(attempts, breaker events) are checked against the harness's failing test service, and the
OTLP exporter against a receiver speaking the collector's gRPC protocol.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from interceptors.chain import ClientChain
from interceptors.errors import CallError
from interceptors.tracing import (
    ATTEMPT_ATTRIBUTE,
    ATTEMPTS_ATTRIBUTE,
    CIRCUIT_OPEN_EVENT,
    STOP_REASON_ATTRIBUTE,
    TARGET_ATTRIBUTE,
    server_interceptor,
)
from paymesh.common.v1 import common_pb2
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from services.accounting.__main__ import build as build_accounting
from services.analytics.__main__ import build as build_analytics
from services.channel_adapter.__main__ import build as build_channel_adapter
from services.merchant.__main__ import build as build_merchant
from services.merchant_auth.__main__ import build as build_merchant_auth
from services.mesh.server import ServerPolicyInterceptor
from services.mesh.tracing import TraceIdFilter, log_format, service_tracer_provider, span_exporter
from services.notification.__main__ import build as build_notification
from services.order.__main__ import build as build_order
from services.payment_gateway.__main__ import build as build_gateway
from services.risk.__main__ import build as build_risk
from tests.integration.harness import (
    TARGET,
    Fault,
    ScriptedServicer,
    eventually,
    make_chain,
    serving,
    stub_for,
)
from tests.integration.test_chain_http import PARTNER, Reply, partner_server
from tests.servers import (
    ServedAddress,
    bearer,
    granted_stub,
    public_channel,
    running_sandbox,
    running_service,
)

#: Every service one CreatePayment reaches (merchant-service through merchant-auth).
PAYMENT_SERVICES = {
    "payment-gateway",
    "merchant-auth-service",
    "merchant-service",
    "risk-service",
    "order-service",
    "channel-adapter",
    "accounting-service",
    "notification-service",
    "analytics-service",
}
UNAVAILABLE = Fault(code=grpc.StatusCode.UNAVAILABLE)


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes[SERVICE_NAME])


def attr(span: ReadableSpan, key: str) -> Any:
    """Attribute ``key`` of ``span`` (KeyError when it has none)."""
    return (span.attributes or {})[key]


def recording_provider(service: str, exporter: InMemorySpanExporter) -> TracerProvider:
    """A tracer provider of ``service`` exporting to ``exporter`` as each span ends."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def traced_chain(
    exporter: InMemorySpanExporter, policy: dict[str, Any] | None = None
) -> ClientChain:
    """A harness chain whose spans go to ``exporter``."""
    return make_chain(policy, tracer_provider=recording_provider("test-caller", exporter))


# --- one payment, one trace --------------------------------------------------------------


@dataclass
class TracedMesh:
    gateway: payment_gateway_pb2_grpc.PaymentGatewayServiceAsyncStub
    merchant_id: str
    api_key: str
    exporter: InMemorySpanExporter


@pytest.fixture
async def traced_mesh(tmp_path: Path) -> AsyncIterator[TracedMesh]:
    exporter = InMemorySpanExporter()
    processors = (SimpleSpanProcessor(exporter),)
    async with contextlib.AsyncExitStack() as stack:
        sandbox_address, _ = stack.enter_context(running_sandbox())
        base = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": sandbox_address}
        addresses: dict[str, ServedAddress] = {}

        async def start(name: str, build: Any, **extra: str) -> ServedAddress:
            addresses[name] = await stack.enter_async_context(
                running_service(name, build, environ={**base, **extra}, span_processors=processors)
            )
            return addresses[name]

        for name, build in (
            ("order-service", build_order),
            ("risk-service", build_risk),
            ("channel-adapter", build_channel_adapter),
            ("accounting-service", build_accounting),
            ("notification-service", build_notification),
            ("analytics-service", build_analytics),
            ("merchant-service", build_merchant),
        ):
            await start(name, build)
        await start(
            "merchant-auth-service",
            build_merchant_auth,
            MERCHANT_SERVICE_ADDR=addresses["merchant-service"],
        )
        downstream = {f"{n.upper().replace('-', '_')}_ADDR": a for n, a in addresses.items()}
        del downstream["MERCHANT_SERVICE_ADDR"]  # not an edge of the gateway
        gateway_address = await start(
            "payment-gateway",
            build_gateway,
            PAYMENT_GATEWAY_RECOVERY_INTERVAL_S="3600",
            **downstream,
        )
        merchants = await stack.enter_async_context(
            granted_stub(
                addresses["merchant-service"],
                merchant_pb2_grpc.MerchantServiceStub,
                "merchant-service",
            )
        )
        auth = await stack.enter_async_context(
            granted_stub(
                addresses["merchant-auth-service"],
                merchant_auth_pb2_grpc.MerchantAuthServiceStub,
                "merchant-auth-service",
            )
        )
        # Merchants pay on the gateway's public TLS port, their key in bearer metadata.
        gateway_channel = await stack.enter_async_context(public_channel(gateway_address.public))
        merchant = (
            await merchants.CreateMerchant(
                merchant_pb2.CreateMerchantRequest(
                    request_id="onboard-1",
                    name="Test Shop",
                    email="shop@example.com",
                    country_code="DE",
                    default_currency_code="EUR",
                    webhook_url="https://merchant.example/hooks",
                )
            )
        ).merchant
        key = await auth.IssueApiKey(
            merchant_auth_pb2.IssueApiKeyRequest(
                request_id="key-1", merchant_id=merchant.merchant_id, label="test"
            )
        )
        yield TracedMesh(
            gateway=payment_gateway_pb2_grpc.PaymentGatewayServiceStub(gateway_channel),
            merchant_id=merchant.merchant_id,
            api_key=key.secret,
            exporter=exporter,
        )


async def _pay(mesh: TracedMesh) -> pg.Payment:
    mesh.exporter.clear()  # onboarding's traces are not the payment's
    reply = await mesh.gateway.CreatePayment(
        pg.CreatePaymentRequest(
            request_id="pay-1",
            merchant_id=mesh.merchant_id,
            amount=common_pb2.Money(amount_minor=2500, currency_code="EUR"),
            payment_method_token="tok_visa",
            customer_ip="192.0.2.10",
            description="two books",
            merchant_order_reference="cart-17",
        ),
        metadata=bearer(mesh.api_key),
    )
    return reply.payment


def _payment_trace(mesh: TracedMesh) -> list[ReadableSpan]:
    spans = list(mesh.exporter.get_finished_spans())
    roots = [s for s in spans if s.name.endswith("/CreatePayment") and s.parent is None]
    assert len(roots) == 1, [s.name for s in spans if s.parent is None]
    trace_id = roots[0].context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id]


async def _settled_trace(mesh: TracedMesh, wanted: set[str]) -> list[ReadableSpan]:
    """The payment's spans once every service in ``wanted`` reported and every reported
    span's parent has ended too (the outbox sends events after the reply, so a child can be
    exported before the client span around it ends)."""

    def settled() -> bool:
        spans = _payment_trace(mesh)
        ids = {s.context.span_id for s in spans}
        return wanted <= {service_of(s) for s in spans} and all(
            s.parent.span_id in ids for s in spans if s.parent is not None
        )

    await eventually(settled, within_s=10.0)
    return _payment_trace(mesh)


async def test_one_payment_is_one_trace_spanning_every_service_it_touched(
    traced_mesh: TracedMesh,
) -> None:
    payment = await _pay(traced_mesh)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    spans = await _settled_trace(traced_mesh, PAYMENT_SERVICES)
    assert {service_of(s) for s in spans} == PAYMENT_SERVICES
    by_id = {s.context.span_id: s for s in spans}
    # One root (the gateway's server span); every other span's parent is in the same trace.
    roots = [s for s in spans if s.parent is None]
    assert [(service_of(r), r.kind) for r in roots] == [("payment-gateway", SpanKind.SERVER)]
    assert all(s.parent.span_id in by_id for s in spans if s.parent is not None)
    # Nothing the payment caused landed in another trace.
    assert len(traced_mesh.exporter.get_finished_spans()) == len(spans)


async def test_downstream_server_spans_are_children_of_the_callers_attempt_spans(
    traced_mesh: TracedMesh,
) -> None:
    await _pay(traced_mesh)
    spans = await _settled_trace(traced_mesh, PAYMENT_SERVICES)
    by_id = {s.context.span_id: s for s in spans}
    servers = [s for s in spans if s.kind == SpanKind.SERVER and s.parent is not None]
    assert {service_of(s) for s in servers} == PAYMENT_SERVICES - {"payment-gateway"}
    for server in servers:
        assert server.parent is not None and server.parent.is_remote
        attempt = by_id[server.parent.span_id]
        assert attempt.kind == SpanKind.CLIENT
        assert attr(attempt, ATTEMPT_ATTRIBUTE) == 1
        assert attr(attempt, TARGET_ATTRIBUTE) == service_of(server)
        assert service_of(attempt) != service_of(server)
        # The attempt hangs under the instrumentation's span of the same call.
        assert attempt.parent is not None
        call = by_id[attempt.parent.span_id]
        assert call.name == server.name  # "/paymesh.<svc>.v1.<Svc>Service/<Method>"
        assert (call.kind, service_of(call)) == (SpanKind.CLIENT, service_of(attempt))


async def test_partner_http_calls_are_client_spans_with_attempts_in_the_trace(
    traced_mesh: TracedMesh,
) -> None:
    await _pay(traced_mesh)
    spans = await _settled_trace(traced_mesh, PAYMENT_SERVICES)
    by_id = {s.context.span_id: s for s in spans}
    requests = [s for s in spans if s.attributes and "http.request.method" in s.attributes]
    partners = {(service_of(s), str(attr(s, TARGET_ATTRIBUTE))) for s in requests}
    assert {
        ("channel-adapter", "payment-channel"),
        ("risk-service", "geo-ip"),
        ("notification-service", "merchant-webhooks"),
    } <= partners
    for request in requests:
        attempts = [s for s in spans if s.parent and s.parent.span_id == request.context.span_id]
        assert [attr(a, ATTEMPT_ATTRIBUTE) for a in attempts] == [1]
        assert attr(attempts[0], "http.response.status_code") < 500
        assert request.parent is not None and request.parent.span_id in by_id


# --- the chain's own spans ----------------------------------------------------------------


async def test_each_retry_attempt_is_a_child_span_numbered_and_sent_to_the_target() -> None:
    exporter = InMemorySpanExporter()
    chain = traced_chain(exporter)
    async with serving() as srv:
        srv.servicer.fail("Read", UNAVAILABLE, UNAVAILABLE)
        async with stub_for(chain, srv.address) as stub:
            await stub.Read(pb.ReadRequest(text="x"))
    spans = exporter.get_finished_spans()
    (call,) = [s for s in spans if s.name == "/paymesh.testing.v1.TestService/Read"]
    attempts = sorted(
        (s for s in spans if s.parent and s.parent.span_id == call.context.span_id),
        key=lambda s: attr(s, ATTEMPT_ATTRIBUTE),
    )
    assert [attr(a, ATTEMPT_ATTRIBUTE) for a in attempts] == [1, 2, 3]
    assert [a.status.status_code for a in attempts] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert attr(call, ATTEMPTS_ATTRIBUTE) == 3
    # Each attempt reached the server carrying its own span as the parent.
    sent = [a.metadata["traceparent"].split("-")[1:3] for a in srv.servicer.attempts]
    assert sent == [[f"{a.context.trace_id:032x}", f"{a.context.span_id:016x}"] for a in attempts]


async def test_breaker_rejection_is_a_circuit_open_event_on_the_attempt_span() -> None:
    exporter = InMemorySpanExporter()
    chain = traced_chain(exporter, {"retry": {"max_attempts": 1}})
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(chain, srv.address) as stub:
            for _ in range(5):  # the fifth failure opens the breaker
                with pytest.raises(CallError):
                    await stub.Read(pb.ReadRequest())
            exporter.clear()
            with pytest.raises(CallError):
                await stub.Read(pb.ReadRequest())
    spans = exporter.get_finished_spans()
    (attempt,) = [s for s in spans if (s.attributes or {}).get(ATTEMPT_ATTRIBUTE) == 1]
    assert [e.name for e in attempt.events] == [CIRCUIT_OPEN_EVENT]
    assert (attempt.events[0].attributes or {})[TARGET_ATTRIBUTE] == TARGET
    (call,) = [s for s in spans if s.name == "/paymesh.testing.v1.TestService/Read"]
    assert attr(call, STOP_REASON_ATTRIBUTE) == "breaker_open"
    assert call.status.status_code == StatusCode.ERROR


async def test_partner_retry_attempts_are_child_spans_whose_traceparent_is_sent() -> None:
    exporter = InMemorySpanExporter()
    client = traced_chain(exporter, {"retry": {"initial_backoff_s": 0.0}})
    with partner_server() as partner:
        partner.script.extend([Reply(status=503), Reply(status=200)])
        http = client.http_client(PARTNER, partner.url)
        reply = await http.request("GET", "/rates")
        await http.aclose()
    assert reply.status == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == f"GET {PARTNER}"]
    attempts = [s for s in spans if s.parent and s.parent.span_id == request.context.span_id]
    assert [attr(a, ATTEMPT_ATTRIBUTE) for a in attempts] == [1, 2]
    assert [attr(a, "http.response.status_code") for a in attempts] == [503, 200]
    sent = [headers["traceparent"].split("-")[1:3] for _, _, headers, _ in partner.seen]
    assert sent == [[f"{a.context.trace_id:032x}", f"{a.context.span_id:016x}"] for a in attempts]


@contextlib.contextmanager
def captured_log(logger: str) -> Iterator[io.StringIO]:
    """Lines of ``logger`` in the services' format, with the trace filter, into a buffer; at
    DEBUG, where the access log writes successful calls too."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(log_format("test-service")))
    handler.addFilter(TraceIdFilter())
    target = logging.getLogger(logger)
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


async def test_server_log_line_carries_the_trace_id_of_the_call() -> None:
    exporter = InMemorySpanExporter()
    provider = recording_provider(TARGET, exporter)
    server = aio.server(
        interceptors=[server_interceptor(provider), ServerPolicyInterceptor(domain=TARGET)]
    )
    testing_pb2_grpc.add_TestServiceServicer_to_server(ScriptedServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with captured_log("paymesh.access") as lines:
            chain = traced_chain(InMemorySpanExporter())
            async with stub_for(chain, f"127.0.0.1:{port}") as stub:
                await stub.Read(pb.ReadRequest(text="x"))
    finally:
        await server.stop(None)
    (span,) = exporter.get_finished_spans()
    assert f"trace_id={span.context.trace_id:032x}" in lines.getvalue()


def test_log_line_outside_a_trace_has_a_dash_for_trace_id() -> None:
    with captured_log("paymesh.test") as lines:
        logging.getLogger("paymesh.test").info("no trace here")
    assert "trace_id=- " in lines.getvalue() or "trace_id=-:" in lines.getvalue()


# --- export -------------------------------------------------------------------------------


def test_nothing_is_exported_without_an_otlp_endpoint() -> None:
    assert span_exporter({}) is None


def test_without_an_exporter_spans_are_not_recorded_but_carry_trace_ids() -> None:
    provider = service_tracer_provider("order-service", {})
    span = provider.get_tracer("test").start_span("call")
    assert not span.is_recording()
    assert span.get_span_context().is_valid
    provider.shutdown()


def test_otlp_endpoint_configures_the_otlp_exporter() -> None:
    exporter = span_exporter({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert isinstance(exporter, OTLPSpanExporter)
    exporter.shutdown()


def test_otel_traces_exporter_none_wins_over_an_endpoint() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_TRACES_EXPORTER": "none",
    }
    assert span_exporter(environ) is None


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's OTLP/gRPC trace endpoint, keeping what it receives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> Sequence[tuple[str, str]]:
        """(service.name, span name) of every span received."""
        out = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    attributes = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope_spans in resource_spans.scope_spans:
                        out += [(attributes["service.name"], s.name) for s in scope_spans.spans]
        return out


@contextlib.contextmanager
def running_receiver() -> Iterator[tuple[str, TraceReceiver]]:
    # A thread-pool server: the service flushes its spans synchronously while stopping, which
    # would block a receiver sharing the test's event loop.
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # opentelemetry-proto ships no type hints for its generated grpc module.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(None)


async def test_spans_reach_an_otlp_receiver_over_grpc_when_the_endpoint_is_set(
    tmp_path: Path,
) -> None:
    with running_receiver() as (endpoint, receiver):
        environ = {"PAYMESH_VAR_DIR": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        async with (
            running_service("order-service", build_order, environ=environ) as address,
            granted_stub(address, order_pb2_grpc.OrderServiceStub, "order-service") as orders,
        ):
            with pytest.raises(aio.AioRpcError):
                await orders.GetOrder(order_pb2.GetOrderRequest(order_id="no-such-order"))
        # Stopping the service flushed its batch; the receiver runs in its own threads.
        wanted = ("order-service", "/paymesh.order.v1.OrderService/GetOrder")
        await eventually(lambda: wanted in receiver.spans())
