"""One payment through the real mesh processes is one trace at an OTLP/gRPC receiver.

Every service exports with its stock OTLP exporter to a receiver built on
``opentelemetry-proto`` in this process, under the default sampler (parent-based trace-id
ratio). The merchant's ``traceparent`` decides: sampled, the receiver gets the whole tree (the
gateway's SERVER span under the merchant's span, each downstream SERVER span under its
caller's attempt span, partner HTTP spans); not sampled, no service records anything of it.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from interceptors.tracing import ATTEMPT_ATTRIBUTE, TARGET_ATTRIBUTE
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as gw
from services.mesh.topology import Partner, Topology
from services.tools.launcher import Mesh, ephemeral_environ
from tests.integration.otlp_receiver import ReceivedSpan, TraceReceiver, running_receiver
from tests.integration.test_payment_flow_processes import Clients, _key, _onboard, _payment
from tests.integration.test_tracing import PAYMENT_SERVICES

pytestmark = pytest.mark.slow

#: Partner calls one cross-currency payment makes, as (calling service, partner).
PARTNER_CALLS = {
    ("channel-adapter", Partner.PAYMENT_CHANNEL),
    ("channel-adapter", Partner.EXCHANGE_RATE),
    ("risk-service", Partner.GEO_IP),
}


#: Last octets of customer IPs, one per payment: risk-service caches geo-IP answers by IP.
_CUSTOMER_HOSTS = itertools.count(1)


@dataclass
class TracedProcesses:
    clients: Clients
    receiver: TraceReceiver
    merchant_id: str
    api_key: str


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedProcesses]:
    var_dir = tmp_path_factory.mktemp("traced-mesh")
    with running_receiver() as (endpoint, receiver):
        environ = ephemeral_environ()
        environ.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_BSP_SCHEDULE_DELAY="100",  # ms: spans reach the receiver soon after they end
            CHANNEL_ADAPTER_RATE_TTL_S="0",  # every payment asks the exchange-rate partner
            MERCHANT_AUTH_SERVICE_MERCHANT_CACHE_S="0",  # and merchant-auth asks merchant-service
        )
        # The default sampler stays: the merchant's traceparent says whether to record.
        for variable in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"):
            environ.pop(variable, None)
        mesh = Mesh(environ=environ, names=PAYMENT_SERVICES, var_dir=var_dir)
        mesh.start(timeout_s=90)
        clients = Clients(mesh, [])
        try:
            merchant_id, api_key = _onboard(clients)
            yield TracedProcesses(clients, receiver, merchant_id, api_key)
        finally:
            for channel in clients.channels:
                channel.close()
            mesh.stop()


@dataclass(frozen=True)
class Traceparent:
    """The W3C trace context a merchant's client sends with its call."""

    trace_id: str
    span_id: str
    sampled: bool

    @classmethod
    def new(cls, *, sampled: bool) -> Traceparent:
        return cls(f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}", sampled)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def pay_in_usd(traced: TracedProcesses, parent: Traceparent) -> gw.Payment:
    """A USD payment settled in EUR (channel-adapter asks for the rate: the mesh caches none)
    from a customer IP no earlier payment used (so risk asks geo-IP), sent under ``parent``."""
    request = _payment(traced.merchant_id, f"traced-{uuid.uuid4().hex[:12]}")
    request.amount.currency_code = "USD"
    request.settlement_currency_code = "EUR"
    request.customer_ip = f"198.51.100.{next(_CUSTOMER_HOSTS)}"
    metadata = (*_key(traced.api_key), ("traceparent", parent.header()))
    payment: gw.Payment = traced.clients.pay.CreatePayment(
        request, timeout=30, metadata=metadata
    ).payment
    assert payment.status == gw.PAYMENT_STATUS_SUCCEEDED, payment.failure_reason
    return payment


def _complete(spans: list[ReceivedSpan], parent: Traceparent) -> bool:
    """Whether the trace has arrived whole: every service, every span's parent (the root's is
    the merchant's), and a SERVER span under every attempt that went to a mesh service."""
    ids = {s.span_id for s in spans} | {parent.span_id}
    services = {s.name for s in Topology().services}
    reached = {s.parent_id for s in spans if s.kind == "SERVER"}
    return (
        {s.service for s in spans} >= PAYMENT_SERVICES
        and all(s.parent_id in ids for s in spans)
        and all(
            s.span_id in reached
            for s in spans
            if ATTEMPT_ATTRIBUTE in s.attributes and s.attributes[TARGET_ATTRIBUTE] in services
        )
    )


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)  # polling the receiver, bounded by the deadline


def whole_trace(traced: TracedProcesses, parent: Traceparent) -> list[ReceivedSpan]:
    wait_for(
        f"trace {parent.trace_id} to arrive whole",
        lambda: _complete(traced.receiver.spans(parent.trace_id), parent),
    )
    return traced.receiver.spans(parent.trace_id)


def test_a_sampled_payment_is_one_trace_rooted_at_the_gateways_server_span(
    traced: TracedProcesses,
) -> None:
    parent = Traceparent.new(sampled=True)
    pay_in_usd(traced, parent)
    spans = whole_trace(traced, parent)
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent_id not in by_id]
    assert (root.service, root.kind, root.name) == (
        "payment-gateway",
        "SERVER",
        "/paymesh.payment_gateway.v1.PaymentGatewayService/CreatePayment",
    )
    assert root.parent_id == parent.span_id
    downstream = [s for s in spans if s.kind == "SERVER" and s is not root]
    assert {s.service for s in downstream} == PAYMENT_SERVICES - {"payment-gateway"}
    for server in downstream:
        # Each downstream SERVER span hangs under the attempt of its caller that reached it,
        # and that attempt under the caller's CLIENT span of the same call.
        attempt = by_id[server.parent_id]
        assert attempt.kind == "CLIENT" and attempt.service != server.service
        assert attempt.attributes[TARGET_ATTRIBUTE] == server.service
        assert attempt.attributes[ATTEMPT_ATTRIBUTE] >= 1
        call = by_id[attempt.parent_id]
        assert (call.kind, call.service, call.name) == ("CLIENT", attempt.service, server.name)


def test_each_span_names_its_service_by_its_mesh_name(traced: TracedProcesses) -> None:
    parent = Traceparent.new(sampled=True)
    pay_in_usd(traced, parent)
    topology = Topology()
    for server in (s for s in whole_trace(traced, parent) if s.kind == "SERVER"):
        proto_service = server.name.split("/")[1]  # "/pkg.Service/Method"
        assert proto_service in topology.service(server.service).proto_services, server


def test_partner_http_calls_are_client_spans_with_an_attempt_under_each(
    traced: TracedProcesses,
) -> None:
    parent = Traceparent.new(sampled=True)
    pay_in_usd(traced, parent)
    wait_for(
        "the partner calls' spans",
        lambda: _partner_calls(traced.receiver.spans(parent.trace_id)) >= PARTNER_CALLS,
    )
    spans = whole_trace(traced, parent)
    by_id = {s.span_id: s for s in spans}
    for request in (s for s in spans if "http.request.method" in s.attributes):
        assert request.kind == "CLIENT" and request.parent_id in by_id
        attempts = [s for s in spans if s.parent_id == request.span_id]
        assert attempts and all(a.kind == "CLIENT" for a in attempts), request
        assert all(ATTEMPT_ATTRIBUTE in a.attributes for a in attempts), request


def _partner_calls(spans: list[ReceivedSpan]) -> set[tuple[str, str]]:
    return {
        (s.service, str(s.attributes.get(TARGET_ATTRIBUTE)))
        for s in spans
        if "http.request.method" in s.attributes
    }


def test_a_payment_whose_traceparent_is_not_sampled_records_no_span_anywhere(
    traced: TracedProcesses,
) -> None:
    unsampled = Traceparent.new(sampled=False)
    pay_in_usd(traced, unsampled)
    # A sampled payment after it, arriving whole, shows every service flushed its batches
    # past the unsampled one; the wait afterwards covers effects sent after the reply.
    marker = Traceparent.new(sampled=True)
    pay_in_usd(traced, marker)
    whole_trace(traced, marker)
    flushed_by = time.monotonic() + 2.0
    while time.monotonic() < flushed_by:
        assert traced.receiver.spans(unsampled.trace_id) == []
        time.sleep(0.1)  # 20 schedule delays of every service's batch processor


def test_the_merchant_port_ignores_a_malformed_traceparent(traced: TracedProcesses) -> None:
    # A merchant's broken header starts a new trace instead of failing the payment.
    request = _payment(traced.merchant_id, f"traced-{uuid.uuid4().hex[:12]}")
    metadata = (*_key(traced.api_key), ("traceparent", "00-not-a-trace-01"))
    reply = traced.clients.pay.CreatePayment(request, timeout=30, metadata=metadata)
    assert reply.payment.status == gw.PAYMENT_STATUS_SUCCEEDED
