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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from interceptors.chain import ClientChain
from interceptors.errors import CallError
from interceptors.tracing import (
    ATTEMPT_ATTRIBUTE,
    ATTEMPTS_ATTRIBUTE,
    CIRCUIT_OPEN_EVENT,
    STOP_REASON_ATTRIBUTE,
    TARGET_ATTRIBUTE,
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
from services.mesh.bootstrap import StartupError
from services.mesh.server import ServerPolicyInterceptor
from services.mesh.tracing import (
    DEFAULT_SAMPLE_RATIO,
    SAMPLER_ARG_VAR,
    SAMPLER_VAR,
    TraceIdFilter,
    log_format,
    server_tracing,
    service_tracer_provider,
    span_exporter,
)
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
from tests.integration.otlp_receiver import running_receiver
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
        base = {
            "PAYMESH_VAR_DIR": str(tmp_path),
            "PARTNER_SANDBOX_ADDR": sandbox_address,
            SAMPLER_ARG_VAR: "1",  # every payment, not the default share of new traces
            # merchant-auth asks merchant-service on every check, so that hop is in each trace
            "MERCHANT_AUTH_SERVICE_MERCHANT_CACHE_S": "0",
        }
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


@contextlib.asynccontextmanager
async def serving_as_a_service(
    servicer: ScriptedServicer, provider: TracerProvider, *, recording: bool
) -> AsyncIterator[str]:
    """``servicer`` behind the tracing and policy interceptors a service builds on
    ``provider``; yields its address."""
    tracing, trace_context = server_tracing(provider, recording=recording)
    policy = ServerPolicyInterceptor(domain=servicer.name, trace_context=trace_context)
    server = aio.server(interceptors=[*tracing, policy])
    testing_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _access_log_of_one_call(
    server_provider: TracerProvider, caller: TracerProvider | None, *, recording: bool
) -> str:
    """The access log of one Read served with the tracing a service builds on
    ``server_provider``, from a chain tracing into ``caller`` (None: an untraced client,
    which sends no ``traceparent``)."""
    servicer = ScriptedServicer(name=TARGET)
    async with serving_as_a_service(servicer, server_provider, recording=recording) as address:
        with captured_log("paymesh.access") as lines:
            async with stub_for(make_chain(tracer_provider=caller), address) as stub:
                await stub.Read(pb.ReadRequest(text="x"))
    return lines.getvalue()


async def test_server_log_line_carries_the_trace_id_of_the_call() -> None:
    exporter = InMemorySpanExporter()
    provider = recording_provider(TARGET, exporter)
    lines = await _access_log_of_one_call(
        provider, recording_provider("test-caller", InMemorySpanExporter()), recording=True
    )
    (span,) = exporter.get_finished_spans()
    assert f"trace_id={span.context.trace_id:032x}" in lines


async def test_unrecorded_server_makes_no_span_and_logs_the_callers_trace_id() -> None:
    server_spans, caller_spans = InMemorySpanExporter(), InMemorySpanExporter()
    lines = await _access_log_of_one_call(
        recording_provider(TARGET, server_spans),
        recording_provider("test-caller", caller_spans),
        recording=False,
    )
    assert server_spans.get_finished_spans() == ()
    trace_ids = {f"{s.context.trace_id:032x}" for s in caller_spans.get_finished_spans()}
    assert len(trace_ids) == 1
    assert f"trace_id={trace_ids.pop()}" in lines


async def test_unrecorded_server_gives_a_call_without_traceparent_a_trace_id_of_its_own() -> None:
    lines = await _access_log_of_one_call(
        recording_provider(TARGET, InMemorySpanExporter()), None, recording=False
    )
    assert "rpc method=/paymesh.testing.v1.TestService/Read" in lines
    assert "trace_id=-" not in lines


async def test_unrecorded_server_continues_the_callers_trace_in_its_downstream_calls() -> None:
    sent = f"00-{'1f' * 16}-{'2e' * 8}-01"
    async with serving() as target, stub_for(make_chain(), target.address) as onward:
        relay = ScriptedServicer(name="relay", next_hop=onward)
        provider = recording_provider("relay", InMemorySpanExporter())
        async with (
            serving_as_a_service(relay, provider, recording=False) as address,
            aio.insecure_channel(address) as channel,
        ):
            await testing_pb2_grpc.TestServiceStub(channel).Relay(
                pb.RelayRequest(), metadata=(("traceparent", sent),)
            )
    # Same trace, same parent (the relay made no span), same sampled flag.
    assert [a.metadata["traceparent"] for a in target.servicer.attempts] == [sent]


async def _read_sent_with(traceparent: str, exporter: InMemorySpanExporter) -> str:
    """The access log of one Read carrying ``traceparent`` to a server whose spans go to
    ``exporter`` (the SDK's default sampler: parent-based)."""
    servicer = ScriptedServicer(name=TARGET)
    provider = recording_provider(TARGET, exporter)
    async with serving_as_a_service(servicer, provider, recording=True) as address:
        with captured_log("paymesh.access") as lines:
            async with aio.insecure_channel(address) as channel:
                await testing_pb2_grpc.TestServiceStub(channel).Read(
                    pb.ReadRequest(), metadata=(("traceparent", traceparent),)
                )
    return lines.getvalue()


async def test_recording_server_makes_no_span_for_a_call_its_caller_did_not_sample() -> None:
    exporter = InMemorySpanExporter()
    lines = await _read_sent_with(f"00-{'3c' * 16}-{'4b' * 8}-00", exporter)
    assert exporter.get_finished_spans() == ()
    assert f"trace_id={'3c' * 16}" in lines


async def test_recording_server_spans_a_call_its_caller_sampled_under_the_callers_span() -> None:
    exporter = InMemorySpanExporter()
    lines = await _read_sent_with(f"00-{'3c' * 16}-{'4b' * 8}-01", exporter)
    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.SERVER
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "4b" * 8
    assert f"trace_id={'3c' * 16}" in lines


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


def recorded_provider(environ: dict[str, str]) -> TracerProvider:
    """The provider a service builds from ``environ`` when something receives its spans."""
    return service_tracer_provider(
        "order-service", environ, span_processors=(SimpleSpanProcessor(InMemorySpanExporter()),)
    )


def described(sampler: Sampler) -> str:
    """What ``sampler`` is, as the SDK describes it (samplers define no equality)."""
    return sampler.get_description()


def test_recorded_default_is_parent_based_trace_id_ratio_at_the_documented_ratio() -> None:
    provider = recorded_provider({})
    assert described(provider.sampler) == described(
        ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))
    )
    provider.shutdown()


def test_children_of_a_sampled_parent_are_recorded_and_of_an_unsampled_one_are_not() -> None:
    provider = recorded_provider({})
    tracer = provider.get_tracer("test")

    def child_of(flags: int) -> trace.Span:
        parent = SpanContext(trace_id=1, span_id=2, is_remote=True, trace_flags=TraceFlags(flags))
        return tracer.start_span(
            "call", context=trace.set_span_in_context(NonRecordingSpan(parent))
        )

    assert child_of(TraceFlags.SAMPLED).is_recording()
    assert not child_of(TraceFlags.DEFAULT).is_recording()
    provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({SAMPLER_ARG_VAR: "1"}, ParentBased(TraceIdRatioBased(1.0))),
        ({SAMPLER_VAR: "always_on"}, ALWAYS_ON),
        ({SAMPLER_VAR: "traceidratio", SAMPLER_ARG_VAR: "0.25"}, TraceIdRatioBased(0.25)),
    ],
)
def test_standard_sampler_variables_win_over_the_default(
    environ: dict[str, str], expected: Sampler
) -> None:
    provider = recorded_provider(environ)
    assert described(provider.sampler) == described(expected)
    provider.shutdown()


@pytest.mark.parametrize(
    ("variable", "value"), [(SAMPLER_VAR, "sometimes"), (SAMPLER_ARG_VAR, "1.5")]
)
async def test_a_bad_sampler_setting_stops_start_up_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), variable: value}
    with pytest.raises(StartupError, match=variable):
        async with running_service("order-service", build_order, environ=environ):
            pass


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


async def test_spans_reach_an_otlp_receiver_over_grpc_when_the_endpoint_is_set(
    tmp_path: Path,
) -> None:
    with running_receiver() as (endpoint, receiver):
        environ = {
            "PAYMESH_VAR_DIR": str(tmp_path),
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            SAMPLER_ARG_VAR: "1",
        }
        async with (
            running_service("order-service", build_order, environ=environ) as address,
            granted_stub(address, order_pb2_grpc.OrderServiceStub, "order-service") as orders,
        ):
            with pytest.raises(aio.AioRpcError):
                await orders.GetOrder(order_pb2.GetOrderRequest(order_id="no-such-order"))
        # Stopping the service flushed its batch; the receiver runs in its own threads.
        wanted = ("order-service", "/paymesh.order.v1.OrderService/GetOrder")
        await eventually(lambda: wanted in {(s.service, s.name) for s in receiver.spans()})


async def test_a_call_below_an_unsampled_parent_makes_no_span_and_forwards_its_context() -> None:
    """Under the parent-based sampler nothing below an unsampled parent is recorded, so the
    chain makes no span for it (not even a dropped one) and forwards the parent's context as is,
    on every attempt; a sampled parent's call is recorded as before."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    chain = make_chain(tracer_provider=provider)
    trace_id, span_id = 0xAB << 64 | 0xCD, 0xEF
    unsampled = NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(0)))
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        srv.servicer.fail("Read", UNAVAILABLE)
        with trace.use_span(unsampled):
            await stub.Read(pb.ReadRequest(text="x"))
        assert exporter.get_finished_spans() == ()
        sent = [a.metadata["traceparent"] for a in srv.servicer.attempts]
        assert sent == [f"00-{trace_id:032x}-{span_id:016x}-00"] * 2
        sampled = NonRecordingSpan(SpanContext(trace_id, span_id, True, TraceFlags(1)))
        with trace.use_span(sampled):
            await stub.Read(pb.ReadRequest(text="x"))
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == [
        "/paymesh.testing.v1.TestService/Read",
        "paymesh.testing.v1.TestService/Read attempt",
    ]
