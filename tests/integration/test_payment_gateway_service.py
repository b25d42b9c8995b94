"""payment-gateway through real gRPC against the real downstream services and partner sandbox.

Every service the gateway calls runs in-process from its own ``build``, all over mTLS; the
sandbox plays the payment channel, geo-IP, exchange rates and the merchants' webhook
endpoints. Merchants call the gateway's public port with their API key in metadata; tests
read the other services' state as the operator (or a mesh identity granted the method).
Webhooks, analytics events and order status changes leave through the gateway's outbox
after the answer, so a test waits for them (:func:`_announced`) before it counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, Reason, retry_delay_of
from interceptors.policy import DEFAULT_POLICY_FILE
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.channel_adapter.v1 import channel_adapter_pb2, channel_adapter_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from paymesh.risk.v1 import risk_pb2_grpc
from services.accounting.__main__ import build as build_accounting
from services.analytics.__main__ import build as build_analytics
from services.channel_adapter.__main__ import build as build_channel_adapter
from services.mesh.bootstrap import Registration, ServiceContext, database_target
from services.mesh.errors import FailedPrecondition
from services.notification.__main__ import build as build_notification
from services.order.__main__ import build as build_order
from services.payment_gateway.__main__ import build as build_gateway
from services.payment_gateway.events import UPDATE_ORDER_STATUS, event_id
from services.payment_gateway.flow import Downstreams, PaymentFlow
from services.payment_gateway.outbox import PENDING, SENT, OutboxRow
from services.payment_gateway.recovery import Recovery, RecoverySchedule
from services.payment_gateway.servicer import for_merchant, scoped_key
from services.payment_gateway.store import (
    NewPayment,
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    RefundStep,
    Step,
    payment_lease,
)
from services.risk.__main__ import build as build_risk
from services.storage.sql import Target
from services.tools.sandbox.app import Fault as SandboxFault
from services.tools.sandbox.app import SandboxState
from tests.integration.tenants import (
    Directory,
    Tenant,
    merchant_stub,
    refusal,
    start_directory,
)
from tests.servers import (
    ServedAddress,
    ServicesUnderTest,
    error_reason,
    granted_stub,
    mesh_channel,
    public_channel,
)

WEBHOOK_URL = "https://merchant.example/hooks"
TERMINAL = {
    pg.PAYMENT_STATUS_SUCCEEDED,
    pg.PAYMENT_STATUS_DECLINED,
    pg.PAYMENT_STATUS_FAILED,
    pg.PAYMENT_STATUS_VOIDED,
}
#: A well-formed payment id no payment has (the store's ids are ``pay_`` and 24 hex digits).
MISSING_PAYMENT = "pay_000000000000000000000000"
GATEWAY = "payment-gateway"


@dataclass
class Mesh:
    """The running services, stubs to them and one onboarded merchant with its key."""

    gateway: Any
    """The gateway's public port, called as the onboarded merchant."""
    operator_gateway: Any
    """The gateway's mesh port, called by the operator (reads only)."""
    gateway_address: ServedAddress
    orders: Any
    channel: Any
    accounting: Any
    analytics: Any
    notifications: Any
    directory: Directory
    sandbox: SandboxState
    tenant: Tenant
    environ: dict[str, str]
    addresses: dict[str, str]
    start_gateway: Callable[..., contextlib.AbstractAsyncContextManager[ServedAddress]]
    """Another gateway for a block, on the same data (its start runs a recovery pass)."""
    services: ServicesUnderTest
    """The harness running them all."""

    @property
    def merchant_id(self) -> str:
        """The onboarded merchant."""
        return self.tenant.merchant_id

    @contextlib.asynccontextmanager
    async def downstreams(self) -> AsyncIterator[Downstreams]:
        """Stubs like the gateway's own (as its identity), for driving a flow outside it."""
        async with contextlib.AsyncExitStack() as stack:

            def channel(name: str) -> aio.Channel:
                opened = mesh_channel(self.addresses[name], as_=GATEWAY)
                stack.push_async_callback(opened.close)
                return opened

            c = {name: channel(name) for name in self.addresses}
            yield Downstreams(
                risk=risk_pb2_grpc.RiskServiceStub(c["risk-service"]),
                orders=order_pb2_grpc.OrderServiceStub(c["order-service"]),
                channel=channel_adapter_pb2_grpc.ChannelAdapterServiceStub(c["channel-adapter"]),
                accounting=accounting_pb2_grpc.AccountingServiceStub(c["accounting-service"]),
                notifications=notification_pb2_grpc.NotificationServiceStub(
                    c["notification-service"]
                ),
                analytics=analytics_pb2_grpc.AnalyticsServiceStub(c["analytics-service"]),
            )

    def as_merchant(
        self, secret: str, address: ServedAddress | None = None
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A gateway stub on the public port calling with API key ``secret``."""
        target = address or self.gateway_address
        return merchant_stub(
            target.public, payment_gateway_pb2_grpc.PaymentGatewayServiceStub, secret
        )


#: The services the gateway calls, each run from its own ``build``, started in this order.
DOWNSTREAMS: dict[str, Any] = {
    "order-service": build_order,
    "risk-service": build_risk,
    "channel-adapter": build_channel_adapter,
    "accounting-service": build_accounting,
    "notification-service": build_notification,
    "analytics-service": build_analytics,
}


@pytest.fixture
async def mesh(services: ServicesUnderTest) -> Mesh:
    directory = await start_directory(services)
    sandbox = services.sandbox()
    for name, build in DOWNSTREAMS.items():
        await services.start(name, build)
    addresses: dict[str, str] = {name: services.addresses[name] for name in DOWNSTREAMS}
    # Passes after the first one run only when a test asks (none waits for them).
    gateway_address = await services.start(
        GATEWAY, build_gateway, environ={"PAYMENT_GATEWAY_RECOVERY_INTERVAL_S": "3600"}
    )

    def start_gateway(
        *, build: Any = build_gateway, **overrides: str
    ) -> contextlib.AbstractAsyncContextManager[ServedAddress]:
        return services.instance(GATEWAY, build=build, environ=overrides)

    async def granted(name: str, stub_type: Any) -> Any:
        return await services.stub(addresses[name], stub_type, name)

    tenant = await directory.onboard(webhook_url=WEBHOOK_URL)
    mesh = Mesh(
        gateway=None,
        operator_gateway=await services.stub(
            gateway_address, payment_gateway_pb2_grpc.PaymentGatewayServiceStub, GATEWAY
        ),
        gateway_address=gateway_address,
        orders=await granted("order-service", order_pb2_grpc.OrderServiceStub),
        channel=await granted(
            "channel-adapter", channel_adapter_pb2_grpc.ChannelAdapterServiceStub
        ),
        accounting=await granted("accounting-service", accounting_pb2_grpc.AccountingServiceStub),
        analytics=await granted("analytics-service", analytics_pb2_grpc.AnalyticsServiceStub),
        notifications=await granted(
            "notification-service", notification_pb2_grpc.NotificationServiceStub
        ),
        directory=directory,
        sandbox=sandbox,
        tenant=tenant,
        environ=services.environ_of(GATEWAY),
        addresses=addresses,
        start_gateway=start_gateway,
        services=services,
    )
    mesh.gateway = await services.stack.enter_async_context(mesh.as_merchant(tenant.secret))
    return mesh


def _create(
    mesh: Mesh, request_id: str = "pay-1", amount: int = 2500, **fields: Any
) -> pg.CreatePaymentRequest:
    request = pg.CreatePaymentRequest(
        request_id=request_id,
        amount=common_pb2.Money(amount_minor=amount, currency_code="EUR"),
        payment_method_token="tok_visa",
        customer_ip="192.0.2.10",
        description="two books",
        merchant_order_reference="cart-17",
    )
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def _refund(
    mesh: Mesh, payment_id: str, request_id: str, amount: int | None = None
) -> pg.RefundPaymentRequest:
    request = pg.RefundPaymentRequest(
        request_id=request_id, payment_id=payment_id, reason="returned"
    )
    if amount is not None:
        request.amount.CopyFrom(common_pb2.Money(amount_minor=amount, currency_code="EUR"))
    return request


async def _fails(call: Awaitable[Any]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


def _charges(mesh: Mesh) -> list[dict[str, Any]]:
    with mesh.sandbox.lock:
        return list(mesh.sandbox.charges.values())


def _webhooks(mesh: Mesh, payment_id: str) -> list[dict[str, Any]]:
    with mesh.sandbox.lock:
        return [w for w in mesh.sandbox.webhooks if payment_id in json.dumps(w)]


async def _balance(mesh: Mesh, account: str) -> int:
    reply = await mesh.accounting.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=account, currency_code="EUR")
    )
    return int(reply.balance.balance.amount_minor)


async def _entries(mesh: Mesh, account: str) -> list[Any]:
    reply = await mesh.accounting.ListEntries(
        accounting_pb2.ListEntriesRequest(account_id=account, page_size=500)
    )
    return list(reply.entries)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.02)


def _available(mesh: Mesh) -> str:
    return f"merchants/{mesh.merchant_id}/available"


def _database(mesh: Mesh) -> Target:
    """The gateway's database, where the gateway itself opens it (a file or a schema)."""
    return database_target(GATEWAY, mesh.environ)


def _outbox(mesh: Mesh, flow_id: str | None = None) -> list[OutboxRow]:
    """The gateway's outbox rows (of one payment or refund), read from its database."""
    store = PaymentStore(_database(mesh))
    try:
        return store.outbox.rows(flow_id=flow_id)
    finally:
        store.close()


async def _announced(mesh: Mesh, *flow_ids: str) -> None:
    """Wait until the outbox delivered every message of these payments or refunds."""

    async def delivered() -> bool:
        return all(r.state != PENDING for f in flow_ids for r in _outbox(mesh, f))

    await _until(delivered)


def _rows(mesh: Mesh, sql: str) -> int:
    """``SELECT COUNT(*)`` of the gateway's database."""
    store = PaymentStore(_database(mesh))
    try:
        return int(store._db.aggregate(sql)[0])
    finally:
        store.close()


def _status_of(error: aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status in {error}")


def _retry_delay(error: aio.AioRpcError) -> float | None:
    return retry_delay_of(_status_of(error))


def _error_metadata(error: aio.AioRpcError) -> dict[str, str]:
    for detail in _status_of(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


# --- CreatePayment ------------------------------------------------------------------------


async def test_payment_succeeds_with_order_one_charge_balanced_ledger_and_webhook(
    mesh: Mesh, engine: str
) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert payment.captured_amount.amount_minor == 2500
    assert payment.ledger_transaction_id == f"txn:{payment.payment_id}:capture"

    # The order's PAID is an announcement of the terminal status: the outbox sends it after
    # the answer, with the webhook and the analytics event.
    await _announced(mesh, payment.payment_id)
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PAID
    assert order.payment_id == payment.payment_id

    assert len(_charges(mesh)) == 1
    txn = (
        await mesh.accounting.GetTransaction(
            accounting_pb2.GetTransactionRequest(transaction_id=payment.ledger_transaction_id)
        )
    ).transaction
    debits = sum(
        e.amount.amount_minor
        for e in txn.entries
        if e.direction == accounting_pb2.ENTRY_DIRECTION_DEBIT
    )
    credits = sum(
        e.amount.amount_minor
        for e in txn.entries
        if e.direction == accounting_pb2.ENTRY_DIRECTION_CREDIT
    )
    assert debits == credits == 2500
    assert await _balance(mesh, _available(mesh)) == 2500
    assert await _balance(mesh, "platform/psp_clearing") == -2500
    await _announced(mesh, payment.payment_id)
    assert len(_webhooks(mesh, payment.payment_id)) == 1


async def test_succeeded_payment_is_recorded_in_analytics(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    await _announced(mesh, payment.payment_id)
    events = await mesh.analytics.ListEvents(
        analytics_pb2.ListEventsRequest(merchant_id=mesh.merchant_id)
    )
    assert [(e.payment_id, e.event_type) for e in events.events] == [
        (payment.payment_id, analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED)
    ]


async def test_risk_decline_ends_declined_without_a_charge(mesh: Mesh) -> None:
    # 203.0.113.x is a high-risk country at the sandbox's geo-IP partner.
    payment = (await mesh.gateway.CreatePayment(_create(mesh, customer_ip="203.0.113.7"))).payment
    assert payment.status == pg.PAYMENT_STATUS_DECLINED
    assert payment.decline_reason == "RISK_DECLINED"
    assert payment.risk_assessment_id
    assert not payment.charge_id
    assert _charges(mesh) == []
    assert await _entries(mesh, _available(mesh)) == []


async def test_channel_decline_ends_declined_and_cancels_the_order(mesh: Mesh) -> None:
    payment = (
        await mesh.gateway.CreatePayment(_create(mesh, payment_method_token="tok_decline"))
    ).payment
    assert payment.status == pg.PAYMENT_STATUS_DECLINED
    assert payment.decline_reason == "CHANNEL_DECLINED"
    assert payment.captured_amount.amount_minor == 0
    await _announced(mesh, payment.payment_id)
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_CANCELLED
    assert await _entries(mesh, _available(mesh)) == []


async def test_twenty_concurrent_duplicates_make_one_payment_one_charge_one_post_one_webhook(
    mesh: Mesh, engine: str
) -> None:
    results = await asyncio.gather(
        *(mesh.gateway.CreatePayment(_create(mesh)) for _ in range(20)), return_exceptions=True
    )
    answers = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert answers, errors
    assert all(isinstance(e, aio.AioRpcError) for e in errors)
    assert {(e.code(), error_reason(e)) for e in errors if isinstance(e, aio.AioRpcError)} <= {
        (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_FLIGHT")
    }
    payment_ids = {a.payment.payment_id for a in answers}
    assert len(payment_ids) == 1
    # A retry after the storm replays the one result.
    replay = await mesh.gateway.CreatePayment(_create(mesh))
    assert {replay.payment.payment_id} == payment_ids

    listed = await mesh.gateway.ListPayments(pg.ListPaymentsRequest(merchant_id=mesh.merchant_id))
    assert len(listed.payments) == 1
    assert len(_charges(mesh)) == 1
    assert len(await _entries(mesh, _available(mesh))) == 1
    await _announced(mesh, replay.payment.payment_id)
    assert len(_webhooks(mesh, replay.payment.payment_id)) == 1


async def test_replay_returns_the_first_result_without_calling_downstream_again(
    mesh: Mesh,
) -> None:
    first = await mesh.gateway.CreatePayment(_create(mesh))
    charges_before = len(_charges(mesh))
    again = await mesh.gateway.CreatePayment(_create(mesh))
    assert again == first
    assert len(_charges(mesh)) == charges_before
    await _announced(mesh, first.payment.payment_id)
    assert len(_webhooks(mesh, first.payment.payment_id)) == 1


async def test_same_request_id_with_another_body_is_invalid_argument(mesh: Mesh) -> None:
    await mesh.gateway.CreatePayment(_create(mesh))
    error = await _fails(mesh.gateway.CreatePayment(_create(mesh, amount=999)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "IDEMPOTENCY_KEY_REUSED"
    assert len(_charges(mesh)) == 1


async def test_replay_with_a_new_key_of_the_same_merchant_is_allowed(mesh: Mesh) -> None:
    first = await mesh.gateway.CreatePayment(_create(mesh))
    second_key = await mesh.directory.issue_key(mesh.merchant_id)
    async with mesh.as_merchant(second_key) as rotated:
        again = await rotated.CreatePayment(_create(mesh))
    assert again == first


async def test_naming_the_own_merchant_id_is_the_same_request_as_leaving_it_empty(
    mesh: Mesh,
) -> None:
    first = await mesh.gateway.CreatePayment(_create(mesh))
    again = await mesh.gateway.CreatePayment(_create(mesh, merchant_id=mesh.merchant_id))
    assert again == first
    assert first.payment.merchant_id == mesh.merchant_id
    assert len(_charges(mesh)) == 1


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("request_id", "", "VALIDATION_FAILED"),
        ("payment_method_token", "", "VALIDATION_FAILED"),
        ("customer_ip", "not-an-ip", "VALIDATION_FAILED"),
        ("customer_country_code", "deu", "VALIDATION_FAILED"),
        ("settlement_currency_code", "ABC", "CURRENCY_UNSUPPORTED"),
        ("description", "x" * 501, "VALIDATION_FAILED"),
    ],
)
async def test_bad_field_is_invalid_argument(
    mesh: Mesh, field: str, value: str, reason: str
) -> None:
    bad: dict[str, Any] = {field: value}
    error = await _fails(mesh.gateway.CreatePayment(_create(mesh, **bad)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == reason
    assert _charges(mesh) == []


@pytest.mark.parametrize(
    ("amount", "currency", "reason"),
    [
        (0, "EUR", "AMOUNT_INVALID"),
        (-100, "EUR", "AMOUNT_INVALID"),
        (10**12 + 1, "EUR", "AMOUNT_INVALID"),
        (2**63 - 1, "EUR", "AMOUNT_INVALID"),
        (100, "XTS", "CURRENCY_UNSUPPORTED"),
    ],
)
async def test_bad_amount_is_invalid_argument(
    mesh: Mesh, amount: int, currency: str, reason: str
) -> None:
    request = _create(mesh)
    request.amount.CopyFrom(common_pb2.Money(amount_minor=amount, currency_code=currency))
    error = await _fails(mesh.gateway.CreatePayment(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == reason


async def test_suspended_merchant_is_permission_denied(mesh: Mesh) -> None:
    await mesh.directory.suspend(mesh.merchant_id)
    error = await _fails(mesh.gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(error) == "MERCHANT_INACTIVE"
    assert _charges(mesh) == []


async def test_unknown_payment_is_not_found(mesh: Mesh) -> None:
    error = await _fails(mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id="pay_nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "PAYMENT_NOT_FOUND"


# --- credentials and tenancy --------------------------------------------------------------

MERCHANT_METHODS = (
    ("CreatePayment", pg.CreatePaymentRequest(request_id="r1")),
    ("GetPayment", pg.GetPaymentRequest(payment_id=MISSING_PAYMENT)),
    ("ListPayments", pg.ListPaymentsRequest()),
    ("RefundPayment", pg.RefundPaymentRequest(request_id="r1", payment_id=MISSING_PAYMENT)),
    ("GetPaymentSummary", pg.GetPaymentSummaryRequest()),
)


def test_api_key_is_no_field_of_any_request_body() -> None:
    for message in (pg.CreatePaymentRequest, pg.RefundPaymentRequest):
        proto = descriptor_pb2.DescriptorProto()
        message.DESCRIPTOR.CopyToProto(proto)
        assert "api_key" not in message.DESCRIPTOR.fields_by_name
        assert "api_key" in proto.reserved_name
        assert [(r.start, r.end) for r in proto.reserved_range] == [(3, 4)]  # end exclusive


@pytest.mark.parametrize(("method", "request_"), MERCHANT_METHODS)
async def test_call_without_api_key_on_the_public_port_is_credentials_missing(
    mesh: Mesh, method: str, request_: Any
) -> None:
    async with public_channel(mesh.gateway_address.public) as channel:
        stub = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)
        error = await _fails(getattr(stub, method)(request_))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "CREDENTIALS_MISSING"


@pytest.mark.parametrize(
    "secret", ["sk_0123456789abcdef_" + "A" * 43, "not-a-key", "sk_" + "k" * 300]
)
async def test_bad_api_key_is_unauthenticated_and_charges_nothing(mesh: Mesh, secret: str) -> None:
    async with mesh.as_merchant(secret) as gateway:
        error = await _fails(gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_INVALID"
    assert _charges(mesh) == []


async def test_payment_for_another_merchant_id_is_not_found(mesh: Mesh) -> None:
    other = await mesh.directory.onboard("Other Shop")
    error = await _fails(mesh.gateway.CreatePayment(_create(mesh, merchant_id=other.merchant_id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "MERCHANT_NOT_FOUND"
    assert _charges(mesh) == []
    listed = await mesh.operator_gateway.ListPayments(
        pg.ListPaymentsRequest(merchant_id=other.merchant_id)
    )
    assert list(listed.payments) == []


async def test_another_merchants_payment_is_not_found_exactly_like_a_missing_one(
    mesh: Mesh,
) -> None:
    other = await mesh.directory.onboard("Other Shop")
    async with mesh.as_merchant(other.secret) as theirs:
        foreign = (await theirs.CreatePayment(_create(mesh))).payment
    missing = await _fails(
        mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=MISSING_PAYMENT))
    )
    refused = await _fails(
        mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=foreign.payment_id))
    )
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    assert refusal(refused, resource_id=foreign.payment_id) == refusal(
        missing, resource_id=MISSING_PAYMENT
    )


async def test_refund_of_another_merchants_payment_is_not_found_and_refunds_nothing(
    mesh: Mesh,
) -> None:
    other = await mesh.directory.onboard("Other Shop")
    async with mesh.as_merchant(other.secret) as theirs:
        foreign = (await theirs.CreatePayment(_create(mesh, amount=1000))).payment
    missing = await _fails(mesh.gateway.RefundPayment(_refund(mesh, MISSING_PAYMENT, "rf-0")))
    refused = await _fails(mesh.gateway.RefundPayment(_refund(mesh, foreign.payment_id, "rf-1")))
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    assert refusal(refused, resource_id=foreign.payment_id) == refusal(
        missing, resource_id=MISSING_PAYMENT
    )
    got = await mesh.operator_gateway.GetPayment(
        pg.GetPaymentRequest(payment_id=foreign.payment_id)
    )
    assert got.payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert list(got.refunds) == []
    assert await _balance(mesh, f"merchants/{other.merchant_id}/available") == 1000


async def test_list_and_summary_show_a_merchant_only_its_own_payments(mesh: Mesh) -> None:
    other = await mesh.directory.onboard("Other Shop")
    own = [(await mesh.gateway.CreatePayment(_create(mesh, f"p-{i}"))).payment for i in range(2)]
    async with mesh.as_merchant(other.secret) as theirs:
        await theirs.CreatePayment(_create(mesh, "p-0", amount=999))

    listed = await mesh.gateway.ListPayments(pg.ListPaymentsRequest())
    assert sorted(p.payment_id for p in listed.payments) == sorted(p.payment_id for p in own)
    summary = (await mesh.gateway.GetPaymentSummary(pg.GetPaymentSummaryRequest())).summary
    assert (summary.merchant_id, summary.payment_count) == (mesh.merchant_id, 2)

    for call in (
        mesh.gateway.ListPayments(pg.ListPaymentsRequest(merchant_id=other.merchant_id)),
        mesh.gateway.GetPaymentSummary(pg.GetPaymentSummaryRequest(merchant_id=other.merchant_id)),
    ):
        error = await _fails(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(error) == "MERCHANT_NOT_FOUND"


async def test_same_request_id_of_two_merchants_makes_two_payments(mesh: Mesh) -> None:
    other = await mesh.directory.onboard("Other Shop")
    mine = (await mesh.gateway.CreatePayment(_create(mesh, "pay-1", amount=1000))).payment
    async with mesh.as_merchant(other.secret) as theirs:
        # The very same body too: a merchant must never get another merchant's payment back.
        first = (await theirs.CreatePayment(_create(mesh, "pay-1", amount=1000))).payment
        replay = (await theirs.CreatePayment(_create(mesh, "pay-1", amount=1000))).payment
        refund = await theirs.RefundPayment(_refund(mesh, first.payment_id, "rf-1", 100))
    own_refund = await mesh.gateway.RefundPayment(_refund(mesh, mine.payment_id, "rf-1", 100))
    assert first.payment_id != mine.payment_id
    assert (mine.merchant_id, first.merchant_id) == (mesh.merchant_id, other.merchant_id)
    assert replay == first
    assert refund.refund.refund_id != own_refund.refund.refund_id
    assert own_refund.payment.payment_id == mine.payment_id
    assert len(_charges(mesh)) == 2
    assert await _balance(mesh, _available(mesh)) == 900
    assert await _balance(mesh, f"merchants/{other.merchant_id}/available") == 900


async def test_mesh_callers_read_any_merchants_payments_by_the_id_they_name(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    got = await mesh.operator_gateway.GetPayment(
        pg.GetPaymentRequest(payment_id=payment.payment_id)
    )
    assert got.payment == payment
    async with mesh_channel(mesh.gateway_address, as_="merchant-service") as channel:
        dashboard_view = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)
        summary = await dashboard_view.GetPaymentSummary(
            pg.GetPaymentSummaryRequest(merchant_id=mesh.merchant_id)
        )
    assert summary.summary.payment_count == 1


async def test_api_key_never_appears_in_any_log_record(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk_0123456789abcdef_" + "Z" * 43
    caplog.set_level(logging.DEBUG)
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    await mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment.payment_id))
    await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 100))
    await _fails(mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=MISSING_PAYMENT)))
    async with mesh.as_merchant(wrong) as guesser:
        await _fails(guesser.CreatePayment(_create(mesh)))
    records = caplog.records
    assert any(GATEWAY in r.getMessage() or "rpc method=" in r.getMessage() for r in records)
    body = mesh.tenant.secret_body
    for record in records:
        text = " ".join((record.getMessage(), repr(record.args), record.exc_text or ""))
        assert body not in text, record
        assert wrong[20:] not in text, record


# --- refunds ------------------------------------------------------------------------------


async def test_partial_then_full_refund_reverses_the_ledger(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    partial = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 300))
    assert partial.refund.status == pg.REFUND_STATUS_SUCCEEDED
    assert partial.refund.ledger_transaction_id == f"txn:{partial.refund.refund_id}"
    assert partial.payment.status == pg.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert partial.payment.refunded_amount.amount_minor == 300
    assert await _balance(mesh, _available(mesh)) == 700

    rest = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-2"))
    assert rest.refund.amount.amount_minor == 700
    assert rest.payment.status == pg.PAYMENT_STATUS_REFUNDED
    assert await _balance(mesh, _available(mesh)) == 0
    assert await _balance(mesh, "platform/psp_clearing") == 0

    got = await mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment.payment_id))
    assert [r.amount.amount_minor for r in got.refunds] == [300, 700]
    await _announced(mesh, partial.refund.refund_id, rest.refund.refund_id)
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_REFUNDED
    with mesh.sandbox.lock:
        charge = next(iter(mesh.sandbox.charges.values()))
    assert charge["refunded_minor"] == 1000


async def test_refund_above_captured_is_failed_precondition(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 600))
    error = await _fails(mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-2", 401)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "REFUND_EXCEEDS_CAPTURED"
    assert await _balance(mesh, _available(mesh)) == 400


async def test_refund_of_a_declined_payment_is_invalid_state(mesh: Mesh) -> None:
    payment = (
        await mesh.gateway.CreatePayment(_create(mesh, payment_method_token="tok_decline"))
    ).payment
    error = await _fails(mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "INVALID_STATE"


async def test_replayed_refund_refunds_once(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    first = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 100))
    again = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 100))
    assert again == first
    assert await _balance(mesh, _available(mesh)) == 900


async def test_ledger_balances_after_a_random_mix_of_payments_and_refunds(mesh: Mesh) -> None:
    rng = random.Random(20240611)
    expected = 0
    for index in range(8):
        amount = rng.randint(1, 5000)
        token = "tok_decline" if rng.random() < 0.2 else "tok_visa"
        payment = (
            await mesh.gateway.CreatePayment(
                _create(mesh, f"mix-{index}", amount=amount, payment_method_token=token)
            )
        ).payment
        if payment.status != pg.PAYMENT_STATUS_SUCCEEDED:
            continue
        expected += amount
        remaining = amount
        for attempt in range(rng.randint(0, 3)):
            ask = rng.randint(1, amount)
            request = _refund(mesh, payment.payment_id, f"mix-{index}-{attempt}", ask)
            if ask <= remaining:
                await mesh.gateway.RefundPayment(request)
                remaining -= ask
                expected -= ask
            else:
                error = await _fails(mesh.gateway.RefundPayment(request))
                assert error_reason(error) == "REFUND_EXCEEDS_CAPTURED"
    assert await _balance(mesh, _available(mesh)) == expected
    assert await _balance(mesh, "platform/psp_clearing") == -expected
    summary = (
        await mesh.gateway.GetPaymentSummary(
            pg.GetPaymentSummaryRequest(merchant_id=mesh.merchant_id)
        )
    ).summary
    totals = {t.currency_code: t for t in summary.currency_totals}
    eur = totals["EUR"]
    assert eur.captured.amount_minor - eur.refunded.amount_minor == expected


async def test_converted_payment_posts_and_refunds_in_the_settlement_currency(
    mesh: Mesh,
) -> None:
    payment = (
        await mesh.gateway.CreatePayment(_create(mesh, amount=1000, settlement_currency_code="USD"))
    ).payment
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert payment.settlement_amount.currency_code == "USD"
    assert payment.exchange_rate

    async def usd_balance() -> int:
        reply = await mesh.accounting.GetBalance(
            accounting_pb2.GetBalanceRequest(account_id=_available(mesh), currency_code="USD")
        )
        return int(reply.balance.balance.amount_minor)

    assert await usd_balance() == payment.settlement_amount.amount_minor
    await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 333))
    await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-2"))
    assert await usd_balance() == 0


# --- reads --------------------------------------------------------------------------------


async def test_list_pages_cover_every_payment_once_newest_first(mesh: Mesh) -> None:
    created = [
        (await mesh.gateway.CreatePayment(_create(mesh, f"p-{i}", amount=100 + i))).payment
        for i in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await mesh.gateway.ListPayments(
            pg.ListPaymentsRequest(merchant_id=mesh.merchant_id, page_size=2, page_token=token)
        )
        assert len(page.payments) <= 2
        seen.extend(p.payment_id for p in page.payments)
        token = page.next_page_token
        if not token:
            break
    assert seen == [p.payment_id for p in reversed(created)]


async def test_list_filters_by_status(mesh: Mesh) -> None:
    await mesh.gateway.CreatePayment(_create(mesh, "p-ok"))
    declined = (
        await mesh.gateway.CreatePayment(_create(mesh, "p-no", payment_method_token="tok_decline"))
    ).payment
    page = await mesh.gateway.ListPayments(
        pg.ListPaymentsRequest(merchant_id=mesh.merchant_id, status=pg.PAYMENT_STATUS_DECLINED)
    )
    assert [p.payment_id for p in page.payments] == [declined.payment_id]
    other = await mesh.operator_gateway.ListPayments(pg.ListPaymentsRequest(merchant_id="m_nobody"))
    assert list(other.payments) == []


async def test_page_token_of_another_filter_is_invalid_argument(mesh: Mesh) -> None:
    for index in range(2):
        await mesh.gateway.CreatePayment(_create(mesh, f"p-{index}"))
    page = await mesh.gateway.ListPayments(
        pg.ListPaymentsRequest(merchant_id=mesh.merchant_id, page_size=1)
    )
    error = await _fails(
        mesh.gateway.ListPayments(
            pg.ListPaymentsRequest(
                merchant_id=mesh.merchant_id,
                status=pg.PAYMENT_STATUS_SUCCEEDED,
                page_token=page.next_page_token,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "PAGE_TOKEN_INVALID"


@pytest.mark.parametrize(
    "request_",
    [
        pg.ListPaymentsRequest(merchant_id=""),
        pg.ListPaymentsRequest(merchant_id="m_1", page_size=-1),
        pg.ListPaymentsRequest(merchant_id="m_1", page_token="garbage!"),
    ],
)
async def test_bad_list_request_of_a_mesh_caller_is_invalid_argument(
    mesh: Mesh, request_: pg.ListPaymentsRequest
) -> None:
    error = await _fails(mesh.operator_gateway.ListPayments(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "request_",
    [
        pg.ListPaymentsRequest(page_size=-1),
        pg.ListPaymentsRequest(page_token="garbage!"),
        pg.ListPaymentsRequest(status=99),  # type: ignore[arg-type]  # out of range on purpose
    ],
)
async def test_bad_list_request_of_a_merchant_is_invalid_argument(
    mesh: Mesh, request_: pg.ListPaymentsRequest
) -> None:
    error = await _fails(mesh.gateway.ListPayments(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_summary_counts_and_totals(mesh: Mesh) -> None:
    paid = (await mesh.gateway.CreatePayment(_create(mesh, "p-1", amount=1000))).payment
    await mesh.gateway.CreatePayment(_create(mesh, "p-2", payment_method_token="tok_decline"))
    await mesh.gateway.RefundPayment(_refund(mesh, paid.payment_id, "rf-1", 250))
    summary = (
        await mesh.gateway.GetPaymentSummary(
            pg.GetPaymentSummaryRequest(merchant_id=mesh.merchant_id)
        )
    ).summary
    assert summary.payment_count == 2
    assert {c.status: c.count for c in summary.status_counts} == {
        pg.PAYMENT_STATUS_PARTIALLY_REFUNDED: 1,
        pg.PAYMENT_STATUS_DECLINED: 1,
    }
    (eur,) = summary.currency_totals
    assert (eur.captured.amount_minor, eur.refunded.amount_minor) == (1000, 250)


# --- crash recovery -----------------------------------------------------------------------


async def _stopped_after(mesh: Mesh, tmp_path: Path, step: str, request_id: str) -> str:
    """Run a payment's flow outside the gateway and stop right after ``step`` is committed.

    The store is left exactly as a gateway killed at that moment would leave it.
    """
    request = _create(mesh, request_id)
    store = PaymentStore(_database(mesh))
    try:
        started = store.begin_payment(
            scoped_key(mesh.merchant_id, request_id),
            for_merchant(request, mesh.merchant_id),
            NewPayment(
                merchant_id=mesh.merchant_id,
                amount=request.amount,
                settlement_currency_code="",
                payment_method_token=request.payment_method_token,
                customer_ip=request.customer_ip,
                customer_country_code="",
                description=request.description,
                merchant_order_reference=request.merchant_order_reference,
                webhook_url=WEBHOOK_URL,
            ),
        )
        assert isinstance(started, PaymentRecord)
        async with mesh.downstreams() as downstreams:
            flow = PaymentFlow(store, downstreams, charge_cutoff_s=900)
            assert await flow.run_payment(started.payment_id, stop_after=step) is None
        return started.payment_id
    finally:
        store.close()


@contextlib.asynccontextmanager
async def _offline_flow(
    mesh: Mesh, tmp_path: Path
) -> AsyncIterator[tuple[PaymentStore, PaymentFlow]]:
    """The gateway's store and a flow over it, with no gateway running: what a killed
    gateway left behind, to run steps of by hand."""
    store = PaymentStore(_database(mesh))
    try:
        async with mesh.downstreams() as downstreams:
            yield store, PaymentFlow(store, downstreams, charge_cutoff_s=900)
    finally:
        store.close()


async def _recovered(mesh: Mesh, payment_id: str) -> pg.Payment:
    """Start a fresh gateway (its start runs a recovery pass) and wait for a terminal status
    and the payment's announcements (webhook, event, order status) delivered by its outbox.
    """
    async with (
        mesh.start_gateway() as address,
        granted_stub(
            address, payment_gateway_pb2_grpc.PaymentGatewayServiceStub, GATEWAY
        ) as gateway,
    ):

        async def done() -> bool:
            got = await gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment_id))
            if got.payment.status not in TERMINAL:
                return False
            rows = _outbox(mesh, payment_id)
            return bool(rows) and all(r.state != PENDING for r in rows)

        await _until(done)
        return (await gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment_id))).payment


@pytest.mark.parametrize(
    "step",
    [Step.CREATED, Step.ASSESSED, Step.CHARGING, Step.CHARGED],
)
async def test_recovery_completes_a_payment_stopped_after_any_step_with_one_charge(
    mesh: Mesh, tmp_path: Path, step: str
) -> None:
    payment_id = await _stopped_after(mesh, tmp_path, step, "crash-1")
    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1
    assert len(await _entries(mesh, _available(mesh))) == 1
    assert await _balance(mesh, _available(mesh)) == 2500
    assert len(_webhooks(mesh, payment_id)) == 1
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PAID


async def test_the_flow_commits_the_order_with_charging_and_the_ledger_with_the_status(
    mesh: Mesh, tmp_path: Path
) -> None:
    # Steps whose callee dedupes the call commit its result with the next state: a payment
    # never rests at ASSESSED, ORDERED or POSTED (a kill there finds CREATED, CHARGING or a
    # terminal status); the assessment is committed with the order's result.
    payment_id = await _stopped_after(mesh, tmp_path, Step.CREATED, "fold-1")
    seen: list[str] = []
    stored: list[str] = []
    async with _offline_flow(mesh, tmp_path) as (store, flow):
        payment = store.payment(payment_id)
        while payment.step != Step.FINISHED:
            payment = await flow._step(payment, recovering=False)
            seen.append(payment.step)
            stored.append(store.payment(payment_id).step)
            if payment.step == Step.CHARGING:
                charging = store.payment(payment_id)
        finished = store.payment(payment_id)
        rows = store.outbox.rows(flow_id=payment_id)
    assert seen == [Step.ASSESSED, Step.CHARGING, Step.CHARGED, Step.FINISHED]
    assert stored == [Step.CREATED, Step.CHARGING, Step.CHARGED, Step.FINISHED]
    assert charging.order_id and charging.risk_assessment_id and charging.risk_decision
    assert finished.order_id and finished.ledger_transaction_id
    assert finished.risk_assessment_id == charging.risk_assessment_id
    paid = [r for r in rows if r.method == UPDATE_ORDER_STATUS]
    assert [order_pb2.UpdateOrderStatusRequest.FromString(r.request).status for r in paid] == [
        order_pb2.ORDER_STATUS_PAID
    ]


async def test_order_paid_after_the_answer_is_sent_by_a_gateway_killed_before_sending_it(
    mesh: Mesh, tmp_path: Path
) -> None:
    # A gateway that committed SUCCEEDED (and answered) but died before its relay ran: the
    # order's PAID, the webhook and the event wait in the outbox; the next gateway sends them.
    payment_id = await _stopped_after(mesh, tmp_path, Step.CHARGED, "answered-1")
    async with _offline_flow(mesh, tmp_path) as (store, flow):
        answered = await flow.run_payment(payment_id)
        assert answered is not None and answered.status == pg.PAYMENT_STATUS_SUCCEEDED
        assert {r.state for r in store.outbox.rows(flow_id=payment_id)} == {PENDING}
    order = (
        await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=answered.order_id))
    ).order
    assert order.status == order_pb2.ORDER_STATUS_CREATED

    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PAID
    assert len(_webhooks(mesh, payment_id)) == 1
    assert len(_charges(mesh)) == 1


@pytest.mark.parametrize("step", [Step.ORDERED, Step.POSTED])
async def test_recovery_completes_a_payment_an_earlier_version_left_at_a_folded_step(
    mesh: Mesh, tmp_path: Path, step: str
) -> None:
    # Earlier versions committed ORDERED and POSTED on their own; their rows still finish.
    payment_id = await _stopped_after(
        mesh, tmp_path, Step.CHARGING if step == Step.ORDERED else Step.CHARGED, f"old-{step}"
    )
    async with _offline_flow(mesh, tmp_path) as (store, flow):
        if step == Step.POSTED:
            # That version posted the capture before committing POSTED.
            capture = flow._capture_request(store.payment(payment_id))
            await mesh.accounting.PostTransaction(capture)
            store.advance(payment_id, step, ledger_transaction_id=capture.transaction_id)
        else:
            store.advance(payment_id, step)
    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1
    assert len(await _entries(mesh, _available(mesh))) == 1
    assert len(_webhooks(mesh, payment_id)) == 1
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PAID


async def test_a_peers_recovery_pass_leaves_a_new_payment_to_the_replica_driving_it(
    mesh: Mesh, engine: str
) -> None:
    # Two gateway replicas on one database. One has just committed a new payment (what its
    # CreatePayment does first) and drives it; the other's recovery pass runs right then, and
    # again while the first is mid-flow. The create commit leased the payment to its creator,
    # so the peer never takes it: it waits, the creator finishes it with one charge.
    request = _create(mesh, "peer-1")
    # Owners of other hosts: a holder of this host whose pid is not alive (or is this test's
    # own, an owner of an earlier process) would count as gone and be taken over at once.
    creator = PaymentStore(_database(mesh), owner="payment-gateway@host-a:1:0bad")
    peer = PaymentStore(_database(mesh), owner="payment-gateway@host-b:1:0bad")
    try:
        async with mesh.downstreams() as downstreams:
            started = creator.begin_payment(
                scoped_key(mesh.merchant_id, "peer-1"),
                for_merchant(request, mesh.merchant_id),
                NewPayment(
                    merchant_id=mesh.merchant_id,
                    amount=request.amount,
                    settlement_currency_code="",
                    payment_method_token=request.payment_method_token,
                    customer_ip=request.customer_ip,
                    customer_country_code="",
                    description=request.description,
                    merchant_order_reference=request.merchant_order_reference,
                    webhook_url=WEBHOOK_URL,
                ),
            )
            assert isinstance(started, PaymentRecord)
            peers_pass = Recovery(
                peer,
                PaymentFlow(peer, downstreams, charge_cutoff_s=900),
                schedule=RecoverySchedule.passes_only(3600),
            )
            report = await peers_pass.run_once()
            assert (report.waiting, report.pending, report.finished) == (1, 0, 0)
            assert peer.payment(started.payment_id).step == Step.CREATED  # nothing called

            flow = PaymentFlow(creator, downstreams, charge_cutoff_s=900)
            driving = asyncio.create_task(flow.run_payment(started.payment_id, claimed=True))
            await asyncio.sleep(0)  # the creator's flow is in its first call
            assert not driving.done()
            report = await peers_pass.run_once()
            assert (report.waiting, report.pending, report.finished) == (1, 0, 0)
            paid = await driving
            holder = peer.leases.holder(payment_lease(started.payment_id))
    finally:
        creator.close()
        peer.close()
    assert paid is not None and paid.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert holder is None  # released with the terminal status
    assert len(_charges(mesh)) == 1
    assert len(await _entries(mesh, _available(mesh))) == 1


async def test_a_refund_killed_between_its_ledger_post_and_its_status_is_posted_once(
    mesh: Mesh, tmp_path: Path
) -> None:
    # The refund's ledger result commits with its terminal status. A gateway killed after the
    # ledger took the reversal but before that commit leaves the refund at REFUNDED; recovery
    # posts the same request again (same request id and transaction id, built from the row)
    # and the ledger replays it: the reversal is in the ledger once.
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    request = _refund(mesh, payment.payment_id, "rf-crash", 400)
    async with _offline_flow(mesh, tmp_path) as (store, flow):
        started = store.begin_refund(
            scoped_key(mesh.merchant_id, "rf-crash"),
            request,
            payment_id=payment.payment_id,
            amount_minor=400,
            reason="returned",
        )
        assert isinstance(started, RefundRecord)
        refunded = await flow._refund_step(started)  # the channel gives the money back
        assert refunded.step == RefundStep.REFUNDED
        reversal = flow._reversal_request(refunded)
        await mesh.accounting.PostTransaction(reversal)  # ... and the ledger took it
    assert await _balance(mesh, _available(mesh)) == 600

    async with (
        mesh.start_gateway() as address,  # its start runs a recovery pass
        granted_stub(
            address, payment_gateway_pb2_grpc.PaymentGatewayServiceStub, GATEWAY
        ) as gateway,
    ):

        async def refunded_() -> bool:
            got = await gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment.payment_id))
            return [r.status for r in got.refunds] == [pg.REFUND_STATUS_SUCCEEDED]

        await _until(refunded_)
    assert await _balance(mesh, _available(mesh)) == 600
    assert len(await _entries(mesh, _available(mesh))) == 2  # the capture and one reversal
    with mesh.sandbox.lock:
        assert len(mesh.sandbox.refunds) == 1
    replay = await mesh.gateway.RefundPayment(request)
    assert replay.refund.status == pg.REFUND_STATUS_SUCCEEDED
    assert replay.refund.ledger_transaction_id == reversal.transaction_id
    assert replay.payment.refunded_amount.amount_minor == 400


async def test_recovery_adopts_a_charge_made_just_before_the_crash(
    mesh: Mesh, tmp_path: Path
) -> None:
    # Killed after the channel charged but before the gateway committed the charge.
    payment_id = await _stopped_after(mesh, tmp_path, Step.CHARGING, "crash-2")
    async with _offline_flow(mesh, tmp_path) as (store, flow):
        await mesh.channel.Charge(flow._charge_request(store.payment(payment_id)))
    assert len(_charges(mesh)) == 1

    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1
    charges = await mesh.channel.ListCharges(
        channel_adapter_pb2.ListChargesRequest(payment_id=payment_id)
    )
    assert [c.charge_id for c in charges.charges] == [payment.charge_id]
    assert len(await _entries(mesh, _available(mesh))) == 1


async def test_client_retry_after_recovery_replays_the_final_result(
    mesh: Mesh, tmp_path: Path
) -> None:
    payment_id = await _stopped_after(mesh, tmp_path, Step.CHARGED, "crash-3")
    recovered = await _recovered(mesh, payment_id)
    replay = await mesh.gateway.CreatePayment(_create(mesh, "crash-3"))
    assert replay.payment.payment_id == payment_id
    assert replay.payment.status == recovered.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1


async def test_retry_of_an_unfinished_payment_is_aborted_until_recovered(
    mesh: Mesh, tmp_path: Path
) -> None:
    await _stopped_after(mesh, tmp_path, Step.CHARGING, "crash-4")
    # The fixture's gateway already ran its start-up pass over an empty store, so nothing
    # finishes this payment until the next pass.
    error = await _fails(mesh.gateway.CreatePayment(_create(mesh, "crash-4")))
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_reason(error) == "IDEMPOTENCY_KEY_IN_FLIGHT"
    assert _charges(mesh) == []


# --- downstream faults --------------------------------------------------------------------


def _dead_address() -> str:
    """A loopback address nothing listens on: calls to it fail at once with UNAVAILABLE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@contextlib.contextmanager
def _hanging_address() -> Iterator[str]:
    """A loopback address that accepts connections and never answers (a hung process)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@contextlib.asynccontextmanager
async def _gateway(
    mesh: Mesh,
    *,
    dead: str,
    address: str | None = None,
    timeout_s: float = 0.3,
    policy: str = "",
    build: Any = build_gateway,
    **overrides: str,
) -> AsyncIterator[Any]:
    """A gateway whose downstream ``dead`` is down (or at ``address``); calls to it give up
    after ``timeout_s``; ``policy`` is appended to the policy file."""
    policy_file = Path(mesh.environ["PAYMESH_VAR_DIR"]) / f"policy-{dead}.toml"
    policy_file.write_text(
        DEFAULT_POLICY_FILE.read_text()
        + f'\n[targets."{dead}"]\ntimeout_s = {timeout_s}\n'
        + policy
    )
    environ = {
        f"{dead.upper().replace('-', '_')}_ADDR": address or _dead_address(),
        "PAYMESH_POLICY_FILE": str(policy_file),
        **overrides,
    }
    async with (
        mesh.start_gateway(build=build, **environ) as served,
        mesh.as_merchant(mesh.tenant.secret, served) as gateway,
    ):
        yield gateway


def _capturing(contexts: list[ServiceContext]) -> Any:
    """The gateway's build, keeping its ServiceContext (its client chain) for the test."""

    async def build(context: ServiceContext) -> Any:
        contexts.append(context)
        return await build_gateway(context)

    return build


def _trips(target: str) -> str:
    """Policy lines that open ``target``'s breaker after two failures in a row."""
    return f'[targets."{target}".breaker]\nconsecutive_failures = 2\nminimum_calls = 2\n'


#: The calls a CreatePayment makes before any charge (the outbox's own calls are others).
AUTHENTICATE = "/paymesh.merchant_auth.v1.MerchantAuthService/AuthenticateApiKey"
ASSESS = "/paymesh.risk.v1.RiskService/AssessPayment"
CREATE_ORDER = "/paymesh.order.v1.OrderService/CreateOrder"


def _calls(context: ServiceContext, *methods: str) -> dict[str, int]:
    """Calls the gateway's client chain made, by method."""
    telemetry = context.clients.chain.telemetry
    return {m: telemetry.value("calls_total", method=m) for m in methods}


async def test_risk_outage_answers_unavailable_and_leaves_the_request_id_free(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="risk-service") as gateway:
        error = await _fails(gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
    assert (_retry_delay(error) or 0) > 0
    assert _error_metadata(error)["target"] == "risk-service"
    assert _rows(mesh, "SELECT COUNT(*) FROM payments") == 0
    assert _rows(mesh, "SELECT COUNT(*) FROM idempotency_keys") == 0
    assert _outbox(mesh) == []
    assert _charges(mesh) == []

    # The very same request, once risk answers, is a payment like any other.
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1


async def test_merchant_auth_outage_answers_unavailable_with_retry_info_and_does_nothing(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="merchant-auth-service") as gateway:
        error = await _fails(gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
    assert _error_metadata(error)["target"] == "merchant-auth-service"
    assert (_retry_delay(error) or 0) > 0
    assert _rows(mesh, "SELECT COUNT(*) FROM idempotency_keys") == 0
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED


async def test_order_outage_frees_the_request_id_and_cancels_the_order_it_may_have_made(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="order-service") as gateway:
        error = await _fails(gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
    assert _error_metadata(error)["target"] == "order-service"
    assert _rows(mesh, "SELECT COUNT(*) FROM payments") == 0
    (cleanup,) = _outbox(mesh)
    assert (cleanup.target, cleanup.state, cleanup.missing_ok) == ("order-service", PENDING, 1)
    assert cleanup.event_id.endswith("_order.abandoned")

    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    # The order was never made: order-service's NOT_FOUND ends the cleanup as delivered.
    await _announced(mesh, cleanup.flow_id)
    assert [r.state for r in _outbox(mesh, cleanup.flow_id)] == [SENT]


async def test_declined_payment_stays_declined_under_its_request_id(mesh: Mesh) -> None:
    first = await mesh.gateway.CreatePayment(_create(mesh, payment_method_token="tok_decline"))
    assert first.payment.status == pg.PAYMENT_STATUS_DECLINED
    again = await mesh.gateway.CreatePayment(_create(mesh, payment_method_token="tok_decline"))
    assert again == first


async def test_channel_outage_leaves_the_payment_to_recovery_which_charges_once(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="channel-adapter") as gateway:
        error = await _fails(gateway.CreatePayment(_create(mesh)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) == "DOWNSTREAM_UNAVAILABLE"
    assert (_retry_delay(error) or 0) > 0
    (pending,) = (
        await mesh.gateway.ListPayments(pg.ListPaymentsRequest(merchant_id=mesh.merchant_id))
    ).payments
    assert pending.status == pg.PAYMENT_STATUS_PENDING

    payment = await _recovered(mesh, pending.payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1
    replay = await mesh.gateway.CreatePayment(_create(mesh))
    assert replay.payment.status == pg.PAYMENT_STATUS_SUCCEEDED


# --- the outbox ---------------------------------------------------------------------------


async def test_webhook_request_id_is_the_stable_event_id_which_its_payload_carries(
    mesh: Mesh,
) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    await _announced(mesh, payment.payment_id)
    evt = event_id(payment.payment_id, "payment.succeeded")
    assert evt == f"evt_{payment.payment_id}_payment.succeeded"
    listed = await mesh.notifications.ListNotifications(
        notification_pb2.ListNotificationsRequest(merchant_id=mesh.merchant_id)
    )
    (notification,) = listed.notifications
    assert notification.request_id == evt
    assert json.loads(notification.payload_json)["event_id"] == evt
    assert {(r.event_id, r.target, r.state) for r in _outbox(mesh, payment.payment_id)} == {
        (evt, "notification-service", SENT),
        (evt, "analytics-service", SENT),
        (evt, "order-service", SENT),  # the order's PAID, with the same id
    }


async def test_answer_does_not_wait_for_a_notification_service_that_hangs(mesh: Mesh) -> None:
    with _hanging_address() as hung:
        # Before the outbox, the webhook was sent before the answer: 30 s, past the 10 s asked.
        async with _gateway(
            mesh, dead="notification-service", address=hung, timeout_s=30
        ) as gateway:
            reply = await gateway.CreatePayment(_create(mesh), timeout=10)
            assert reply.payment.status == pg.PAYMENT_STATUS_SUCCEEDED
            (webhook,) = [
                r
                for r in _outbox(mesh, reply.payment.payment_id)
                if r.target == "notification-service"
            ]
            assert webhook.state == PENDING


async def test_events_wait_in_the_outbox_while_notification_is_down_then_go_out_once(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="notification-service") as gateway:
        payment = (await gateway.CreatePayment(_create(mesh))).payment

        async def attempted() -> bool:
            rows = _outbox(mesh, payment.payment_id)
            return any(r.target == "notification-service" and r.attempts for r in rows)

        await _until(attempted)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert _webhooks(mesh, payment.payment_id) == []
    (waiting,) = [r for r in _outbox(mesh, payment.payment_id) if r.state == PENDING]
    assert waiting.target == "notification-service"
    assert waiting.last_error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert waiting.next_attempt_time >= waiting.create_time

    async with mesh.start_gateway():  # its relay picks up the rows at start
        await _announced(mesh, payment.payment_id)
    assert len(_webhooks(mesh, payment.payment_id)) == 1
    events = await mesh.analytics.ListEvents(
        analytics_pb2.ListEventsRequest(merchant_id=mesh.merchant_id)
    )
    assert len(events.events) == 1


async def test_announcements_of_a_payment_refunded_during_an_outage_all_go_out_once(
    mesh: Mesh,
) -> None:
    async with _gateway(mesh, dead="notification-service") as gateway:
        payment = (await gateway.CreatePayment(_create(mesh, amount=1000))).payment
        refunded = await gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 400))
    assert refunded.refund.status == pg.REFUND_STATUS_SUCCEEDED
    assert _webhooks(mesh, payment.payment_id) == []

    async with mesh.start_gateway():
        await _announced(mesh, payment.payment_id, refunded.refund.refund_id)
    kinds = sorted(str(w.get("event_type")) for w in _webhooks(mesh, payment.payment_id))
    assert kinds == ["payment.refunded", "payment.succeeded"]
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED


# --- fail fast ----------------------------------------------------------------------------


async def test_open_breaker_refuses_create_payment_before_authenticating_or_writing(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    contexts: list[ServiceContext] = []
    async with _gateway(
        mesh, dead="order-service", policy=_trips("order-service"), build=_capturing(contexts)
    ) as gateway:
        (context,) = contexts
        breakers = context.clients.chain.breakers
        for attempt in range(5):  # the order step fails until its breaker opens
            await _fails(gateway.CreatePayment(_create(mesh, f"ff-trip-{attempt}")))
            if breakers.states().get("order-service") == "open":
                break
        assert breakers.states()["order-service"] == "open"
        called = _calls(context, AUTHENTICATE, ASSESS, CREATE_ORDER)
        assert all(called.values())  # the tripping calls went all the way
        tables = ("payments", "idempotency_keys", "outbox")
        written = {t: _rows(mesh, f"SELECT COUNT(*) FROM {t}") for t in tables}

        caplog.set_level(logging.INFO, logger="paymesh.access")
        refusals = 20
        for index in range(refusals):
            error = await _fails(gateway.CreatePayment(_create(mesh, f"ff-{index}")))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(error) == "CIRCUIT_OPEN"
            assert _error_metadata(error)["target"] == "order-service"
            assert 0 < (_retry_delay(error) or 0) <= 30
        assert _calls(context, AUTHENTICATE, ASSESS, CREATE_ORDER) == called
        assert {t: _rows(mesh, f"SELECT COUNT(*) FROM {t}") for t in tables} == written
    durations = [
        float(found.group(1))
        for record in caplog.records
        if (
            found := re.search(
                r"/CreatePayment code=UNAVAILABLE duration_ms=([\d.]+)", record.getMessage()
            )
        )
    ][-refusals:]
    assert len(durations) == refusals
    print(
        f"\nfail-fast CreatePayment, time in the server over {refusals} calls:"
        f" median {statistics.median(durations):.2f} ms, max {max(durations):.2f} ms"
    )


async def test_open_channel_breaker_refuses_refund_payment_before_reserving_anything(
    mesh: Mesh,
) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    contexts: list[ServiceContext] = []
    async with _gateway(
        mesh, dead="channel-adapter", policy=_trips("channel-adapter"), build=_capturing(contexts)
    ) as gateway:
        breakers = contexts[0].clients.chain.breakers
        for attempt in range(5):
            await _fails(
                gateway.RefundPayment(_refund(mesh, payment.payment_id, f"rf-{attempt}", 1))
            )
            if breakers.states().get("channel-adapter") == "open":
                break
        refunds = _rows(mesh, "SELECT COUNT(*) FROM refunds")
        error = await _fails(gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-x", 1)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) == "CIRCUIT_OPEN"
    assert _error_metadata(error)["target"] == "channel-adapter"
    assert _rows(mesh, "SELECT COUNT(*) FROM refunds") == refunds


# --- the recovery loop --------------------------------------------------------------------


async def test_recovery_waits_out_a_risk_outage_then_finishes_the_payment(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payment_id = await _stopped_after(mesh, tmp_path, Step.CREATED, "wait-1")
    contexts: list[ServiceContext] = []
    async with _gateway(
        mesh,
        dead="risk-service",
        build=_capturing(contexts),
        PAYMENT_GATEWAY_RECOVERY_INTERVAL_S="0.05",
    ):

        async def retried() -> bool:  # passes after the first, each after its backoff
            return _calls(contexts[0], ASSESS)[ASSESS] >= 2

        await _until(retried)
        got = await mesh.operator_gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment_id))
        # Racing a dependency at start once ended payments FAILED: now they wait.
        assert got.payment.status == pg.PAYMENT_STATUS_PENDING
    noisy = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "payment_gateway" in r.name
    ]
    assert noisy == []

    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert len(_charges(mesh)) == 1


# --- voids, refused charges, failed and recovered refunds ----------------------------------


def _refusing(build: Any, method: str, refuse: Callable[[Any], Exception | None]) -> Any:
    """``build`` of a real service whose ``method`` raises ``refuse(request)`` when that is an
    exception (and answers as usual when it is None): a downstream that fails on command."""

    async def refusing_build(context: ServiceContext) -> Any:
        registrations = build(context)
        if inspect.isawaitable(registrations):
            registrations = await registrations
        first = registrations[0]
        servicer = first.servicer if isinstance(first, Registration) else first
        answer = getattr(servicer, method)

        async def refusing_method(request: Any, call_context: Any) -> Any:
            error = refuse(request)
            if error is not None:
                raise error
            return await answer(request, call_context)

        setattr(servicer, method, refusing_method)
        return registrations

    return refusing_build


@contextlib.asynccontextmanager
async def _refusing_downstream(
    mesh: Mesh, tmp_path: Path, name: str, build: Any, method: str, refuse: Any
) -> AsyncIterator[ServedAddress]:
    """A second instance of downstream ``name`` (its own var dir) refusing as ``refuse`` says."""
    var_dir = tmp_path / f"refusing-{name}"
    var_dir.mkdir()
    async with mesh.services.instance(
        name, build=_refusing(build, method, refuse), environ={"PAYMESH_VAR_DIR": str(var_dir)}
    ) as address:
        yield address


def _captures(request: accounting_pb2.PostTransactionRequest) -> Exception | None:
    if request.kind != accounting_pb2.TRANSACTION_KIND_PAYMENT:
        return None
    return FailedPrecondition("the ledger refuses this capture", reason=Reason.LEDGER_UNBALANCED)


async def test_capture_the_ledger_refuses_voids_the_charge_and_posts_nothing(
    mesh: Mesh, tmp_path: Path
) -> None:
    async with (
        _refusing_downstream(
            mesh, tmp_path, "accounting-service", build_accounting, "PostTransaction", _captures
        ) as ledger_address,
        _gateway(mesh, dead="accounting-service", address=ledger_address, timeout_s=10) as gateway,
        granted_stub(
            ledger_address, accounting_pb2_grpc.AccountingServiceStub, "accounting-service"
        ) as refusing_ledger,
    ):
        payment = (await gateway.CreatePayment(_create(mesh))).payment
        assert payment.status == pg.PAYMENT_STATUS_VOIDED
        assert payment.failure_reason == "LEDGER_UNBALANCED"
        assert not payment.ledger_transaction_id
        # The authorisation is undone at the channel, and neither ledger holds an entry.
        (charge,) = _charges(mesh)
        assert (charge["status"], charge["refunded_minor"]) == ("voided", 2500)
        listed = await mesh.channel.ListCharges(
            channel_adapter_pb2.ListChargesRequest(payment_id=payment.payment_id)
        )
        assert [c.status for c in listed.charges] == [channel_adapter_pb2.CHARGE_STATUS_VOIDED]
        entries = await refusing_ledger.ListEntries(
            accounting_pb2.ListEntriesRequest(account_id=_available(mesh), page_size=10)
        )
        assert list(entries.entries) == []
    assert await _entries(mesh, _available(mesh)) == []
    await _announced(mesh, payment.payment_id)
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_CANCELLED
    got = await mesh.gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment.payment_id))
    assert got.payment.status == pg.PAYMENT_STATUS_VOIDED
    # A voided payment is not refundable: nothing was captured for the merchant.
    error = await _fails(mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1")))
    assert error_reason(error) == "INVALID_STATE"


async def test_charge_the_channel_adapter_refuses_fails_the_payment_with_its_reason(
    mesh: Mesh, tmp_path: Path
) -> None:
    def refuse(request: channel_adapter_pb2.ChargeRequest) -> Exception:
        return FailedPrecondition("no charges today", reason=Reason.CURRENCY_UNSUPPORTED)

    async with (
        _refusing_downstream(
            mesh, tmp_path, "channel-adapter", build_channel_adapter, "Charge", refuse
        ) as channel_address,
        _gateway(mesh, dead="channel-adapter", address=channel_address, timeout_s=10) as gateway,
    ):
        payment = (await gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_FAILED
    assert payment.failure_reason == "CURRENCY_UNSUPPORTED"
    assert not payment.charge_id
    assert _charges(mesh) == []
    assert await _entries(mesh, _available(mesh)) == []
    await _announced(mesh, payment.payment_id)
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_CANCELLED


async def test_charge_the_channel_refuses_fails_the_payment_and_posts_nothing(
    mesh: Mesh,
) -> None:
    with mesh.sandbox.lock:
        mesh.sandbox.faults["payment-channel"] = SandboxFault(error_rate=1.0, status=400)
    payment = (await mesh.gateway.CreatePayment(_create(mesh))).payment
    assert payment.status == pg.PAYMENT_STATUS_FAILED
    assert "HTTP 400" in payment.failure_reason
    assert _charges(mesh) == []
    assert await _entries(mesh, _available(mesh)) == []


async def test_refund_the_channel_refuses_fails_and_leaves_payment_and_ledger_as_they_were(
    mesh: Mesh,
) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    with mesh.sandbox.lock:
        mesh.sandbox.faults["payment-channel"] = SandboxFault(error_rate=1.0, status=409)
    refused = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-1", 300))
    assert refused.refund.status == pg.REFUND_STATUS_FAILED
    assert refused.refund.failure_reason == "INVALID_STATE"
    assert not refused.refund.ledger_transaction_id
    assert refused.payment.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert refused.payment.refunded_amount.amount_minor == 0
    assert await _balance(mesh, _available(mesh)) == 1000
    with mesh.sandbox.lock:
        assert mesh.sandbox.refunds == {}
        mesh.sandbox.faults.clear()
    await _announced(mesh, refused.refund.refund_id)
    assert "refund.failed" in json.dumps(_webhooks(mesh, refused.refund.refund_id))
    # Nothing stayed reserved: the whole amount can still be refunded.
    refund = await mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-2"))
    assert refund.refund.status == pg.REFUND_STATUS_SUCCEEDED
    assert refund.refund.amount.amount_minor == 1000
    assert await _balance(mesh, _available(mesh)) == 0


async def test_recovery_finishes_a_refund_left_unposted_by_a_ledger_outage(mesh: Mesh) -> None:
    payment = (await mesh.gateway.CreatePayment(_create(mesh, amount=1000))).payment
    request = _refund(mesh, payment.payment_id, "rf-1", 400)
    async with _gateway(mesh, dead="accounting-service") as gateway:
        error = await _fails(gateway.RefundPayment(request))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error) == "DOWNSTREAM_UNAVAILABLE"
    # The channel gave the money back; the ledger has not heard of it yet.
    assert _rows(mesh, "SELECT COUNT(*) FROM refunds WHERE step = 'refunded'") == 1
    with mesh.sandbox.lock:
        assert [r["amount_minor"] for r in mesh.sandbox.refunds.values()] == [400]
    assert await _balance(mesh, _available(mesh)) == 1000
    # Until recovery finished it, its request id is in flight and its amount reserved.
    in_flight = await _fails(mesh.gateway.RefundPayment(request))
    assert (in_flight.code(), error_reason(in_flight)) == (
        grpc.StatusCode.ABORTED,
        "IDEMPOTENCY_KEY_IN_FLIGHT",
    )
    too_much = await _fails(
        mesh.gateway.RefundPayment(_refund(mesh, payment.payment_id, "rf-2", 601))
    )
    assert error_reason(too_much) == "REFUND_EXCEEDS_CAPTURED"

    async with (
        mesh.start_gateway() as address,  # its start runs a recovery pass
        granted_stub(
            address, payment_gateway_pb2_grpc.PaymentGatewayServiceStub, GATEWAY
        ) as gateway,
    ):

        async def refunded() -> bool:
            got = await gateway.GetPayment(pg.GetPaymentRequest(payment_id=payment.payment_id))
            return [r.status for r in got.refunds] == [pg.REFUND_STATUS_SUCCEEDED]

        await _until(refunded)
    assert _rows(mesh, "SELECT COUNT(*) FROM refunds WHERE step = 'refunded'") == 0
    assert await _balance(mesh, _available(mesh)) == 600
    with mesh.sandbox.lock:
        assert len(mesh.sandbox.refunds) == 1  # recovery posted it; it did not refund again
    replay = await mesh.gateway.RefundPayment(request)
    assert replay.refund.status == pg.REFUND_STATUS_SUCCEEDED
    assert replay.payment.status == pg.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert replay.payment.refunded_amount.amount_minor == 400


async def test_recovery_of_a_payment_killed_after_its_order_call_before_its_commit(
    mesh: Mesh, tmp_path: Path
) -> None:
    # The assessment is committed with the order's result: a gateway killed after CreateOrder
    # answered but before that commit leaves the payment at CREATED with its order made.
    # Recovery repeats the assessment and CreateOrder (both replayed) and charges once.
    payment_id = await _stopped_after(mesh, tmp_path, Step.CHARGING, "order-no-commit-1")
    store = PaymentStore(_database(mesh))
    try:
        with store._db.transaction() as tx:
            tx.run(
                "UPDATE payments SET step = ?, order_id = '', risk_assessment_id = '',"
                " risk_decision = 0, risk_score = 0 WHERE payment_id = ?",
                (Step.CREATED, payment_id),
            )
    finally:
        store.close()
    payment = await _recovered(mesh, payment_id)
    assert payment.status == pg.PAYMENT_STATUS_SUCCEEDED and payment.risk_assessment_id
    assert len(_charges(mesh)) == 1
    assert await _balance(mesh, _available(mesh)) == 2500
    order = (await mesh.orders.GetOrder(order_pb2.GetOrderRequest(order_id=payment.order_id))).order
    assert order.status == order_pb2.ORDER_STATUS_PAID
