"""The batch RPCs through real gRPC on loopback: one result per item, in order; a duplicate
replays, a bad item fails alone, the good ones are stored once; an oversize batch is refused
whole; only the callers the topology grants the batch may call it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeAlias

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.analytics.__main__ import build as build_analytics
from services.mesh.batch import MAX_BATCH_ITEMS
from services.notification.__main__ import build as build_notification
from services.order.__main__ import build as build_order
from tests.servers import ServicesUnderTest, error_reason, mesh_channel, rich_status_of

APPLIED = common_pb2.BATCH_ITEM_OUTCOME_APPLIED
DUPLICATE = common_pb2.BATCH_ITEM_OUTCOME_DUPLICATE
FAILED = common_pb2.BATCH_ITEM_OUTCOME_FAILED
WEBHOOK_URL = "https://merchant.example/hooks"

Analytics: TypeAlias = "analytics_pb2_grpc.AnalyticsServiceAsyncStub"
Orders: TypeAlias = "order_pb2_grpc.OrderServiceAsyncStub"
Notifications: TypeAlias = "notification_pb2_grpc.NotificationServiceAsyncStub"


def _event(event_id: str, *, merchant_id: str = "m_1", amount: int = 1000) -> Any:
    return analytics_pb2.RecordEventRequest(
        request_id=event_id,
        merchant_id=merchant_id,
        event_type=analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED,
        payment_id=f"pay_{event_id}",
        amount=common_pb2.Money(amount_minor=amount, currency_code="EUR"),
    )


def _update(request_id: str, order_id: str, status: order_pb2.OrderStatus.ValueType) -> Any:
    return order_pb2.UpdateOrderStatusRequest(
        request_id=request_id, order_id=order_id, status=status, reason="test"
    )


def _notification(request_id: str, *, payload: str = '{"ok": true}') -> Any:
    return notification_pb2.SendNotificationRequest(
        request_id=request_id,
        merchant_id="m_1",
        event_type="payment.succeeded",
        payload_json=payload,
        webhook_url=WEBHOOK_URL,
    )


def _status(result: Any) -> status_pb2.Status:
    """The item's error as the google.rpc.Status it is, byte for byte."""
    return status_pb2.Status.FromString(result.error.SerializeToString())


def _details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return info, fields


@pytest.fixture
async def analytics(services: ServicesUnderTest) -> Analytics:
    return await services.serve(
        "analytics-service", build_analytics, analytics_pb2_grpc.AnalyticsServiceStub
    )


@pytest.fixture
async def orders(services: ServicesUnderTest) -> Orders:
    return await services.serve("order-service", build_order, order_pb2_grpc.OrderServiceStub)


@pytest.fixture
async def notifications(services: ServicesUnderTest) -> Notifications:
    services.sandbox()
    return await services.serve(
        "notification-service", build_notification, notification_pb2_grpc.NotificationServiceStub
    )


async def test_events_batch_answers_per_item_and_stores_each_good_event_once(
    analytics: Analytics,
) -> None:
    await analytics.RecordEvent(_event("ev_before"))
    reply = await analytics.RecordEvents(
        analytics_pb2.RecordEventsRequest(
            events=[
                _event("ev_1"),
                _event("ev_before"),  # recorded by the single RPC: the same namespace
                _event("ev_bad", merchant_id=""),
                _event("ev_1"),  # a repeat within the batch
                _event("ev_1", amount=5),  # the id again with another body
                _event("ev_2"),
            ]
        )
    )
    outcomes = [r.outcome for r in reply.results]
    assert outcomes == [APPLIED, DUPLICATE, FAILED, DUPLICATE, FAILED, APPLIED]
    assert [r.response.event.event_id for r in reply.results if r.outcome != FAILED] == [
        "ev_1",
        "ev_before",
        "ev_1",
        "ev_2",
    ]
    bad = _status(reply.results[2])
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, fields = _details(bad)
    assert (info.reason, info.domain, fields) == (
        "VALIDATION_FAILED",
        "analytics-service",
        ["merchant_id"],
    )
    assert _details(_status(reply.results[4]))[0].reason == "IDEMPOTENCY_KEY_REUSED"
    stats = await analytics.GetMerchantStats(
        analytics_pb2.GetMerchantStatsRequest(merchant_id="m_1")
    )
    assert stats.stats.event_count == 3  # ev_before, ev_1, ev_2


async def test_order_batch_applies_in_order_and_a_refused_change_fails_alone(
    orders: Orders,
) -> None:
    await orders.CreateOrder(
        order_pb2.CreateOrderRequest(
            request_id="c_1",
            order_id="ord_1",
            merchant_id="m_1",
            payment_id="pay_1",
            amount=common_pb2.Money(amount_minor=1000, currency_code="EUR"),
        )
    )
    reply = await orders.UpdateOrderStatuses(
        order_pb2.UpdateOrderStatusesRequest(
            updates=[
                _update("u_paid", "ord_1", order_pb2.ORDER_STATUS_PAID),
                _update("u_missing", "ord_none", order_pb2.ORDER_STATUS_PAID),
                _update("u_back", "ord_1", order_pb2.ORDER_STATUS_CREATED),  # not allowed
                _update("u_refund", "ord_1", order_pb2.ORDER_STATUS_REFUNDED),
                _update("u_paid", "ord_1", order_pb2.ORDER_STATUS_PAID),
            ]
        )
    )
    assert [r.outcome for r in reply.results] == [APPLIED, FAILED, FAILED, APPLIED, DUPLICATE]
    assert [_status(reply.results[i]).code for i in (1, 2)] == [
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
    ]
    assert _details(_status(reply.results[2]))[0].reason == "INVALID_STATE"
    assert reply.results[4].response.order.status == order_pb2.ORDER_STATUS_PAID  # the replay
    order = await orders.GetOrder(order_pb2.GetOrderRequest(order_id="ord_1"))
    assert order.order.status == order_pb2.ORDER_STATUS_REFUNDED
    # The refused change left its request id free, exactly as the single RPC does.
    with pytest.raises(aio.AioRpcError) as refused:
        await orders.UpdateOrderStatus(_update("u_back", "ord_1", order_pb2.ORDER_STATUS_CREATED))
    assert error_reason(refused.value) == "INVALID_STATE"


async def test_notification_batch_records_each_good_notification_once(
    notifications: Notifications,
) -> None:
    reply = await notifications.SendNotifications(
        notification_pb2.SendNotificationsRequest(
            notifications=[
                _notification("evt_1"),
                _notification("evt_bad", payload="[]"),
                _notification("evt_1"),
                _notification("evt_2"),
            ]
        )
    )
    assert [r.outcome for r in reply.results] == [APPLIED, FAILED, DUPLICATE, APPLIED]
    assert _details(_status(reply.results[1]))[1] == ["payload_json"]
    first, again = reply.results[0].response.notification, reply.results[2].response.notification
    assert first.notification_id == again.notification_id
    listed = await notifications.ListNotifications(
        notification_pb2.ListNotificationsRequest(merchant_id="m_1")
    )
    assert sorted(n.request_id for n in listed.notifications) == ["evt_1", "evt_2"]
    # Each was attempted once: the repeat within the batch attempted nothing.
    assert [n.attempt_count for n in listed.notifications] == [1, 1]


@pytest.mark.parametrize("size", [0, MAX_BATCH_ITEMS + 1])
async def test_an_empty_or_oversize_batch_is_refused_whole(
    analytics: Analytics, orders: Orders, size: int
) -> None:
    calls: list[tuple[Awaitable[object], str]] = [
        (
            analytics.RecordEvents(
                analytics_pb2.RecordEventsRequest(events=[_event(f"e{i}") for i in range(size)])
            ),
            "events",
        ),
        (
            orders.UpdateOrderStatuses(
                order_pb2.UpdateOrderStatusesRequest(
                    updates=[
                        _update(f"u{i}", "o", order_pb2.ORDER_STATUS_PAID) for i in range(size)
                    ]
                )
            ),
            "updates",
        ),
    ]
    for call, field in calls:
        with pytest.raises(aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(rich_status_of(refused.value))[1] == [field]
    stats = await analytics.GetMerchantStats(
        analytics_pb2.GetMerchantStatsRequest(merchant_id="m_1")
    )
    assert stats.stats.event_count == 0  # nothing of the refused batch was applied


async def test_a_full_batch_is_taken(analytics: Analytics) -> None:
    events = [_event(f"ev_{i}") for i in range(MAX_BATCH_ITEMS)]
    reply = await analytics.RecordEvents(analytics_pb2.RecordEventsRequest(events=events))
    assert {r.outcome for r in reply.results} == {APPLIED}
    assert len(reply.results) == MAX_BATCH_ITEMS


@pytest.mark.parametrize(
    ("service", "build", "stub_type", "method", "request_"),
    [
        (
            "analytics-service",
            build_analytics,
            analytics_pb2_grpc.AnalyticsServiceStub,
            "RecordEvents",
            analytics_pb2.RecordEventsRequest(events=[_event("ev_1")]),
        ),
        (
            "order-service",
            build_order,
            order_pb2_grpc.OrderServiceStub,
            "UpdateOrderStatuses",
            order_pb2.UpdateOrderStatusesRequest(
                updates=[_update("u_1", "ord_1", order_pb2.ORDER_STATUS_PAID)]
            ),
        ),
        (
            "notification-service",
            build_notification,
            notification_pb2_grpc.NotificationServiceStub,
            "SendNotifications",
            notification_pb2.SendNotificationsRequest(notifications=[_notification("evt_1")]),
        ),
    ],
)
async def test_the_batch_method_is_denied_to_a_caller_the_topology_does_not_grant(
    services: ServicesUnderTest,
    service: str,
    build: Any,
    stub_type: Any,
    method: str,
    request_: Any,
) -> None:
    address = await services.start(service, build)
    # settlement-service may SendNotification, but no batch; merchant-service calls the
    # others' read methods only; the operator reads.
    for caller in ("settlement-service", "merchant-service", "operator"):
        async with mesh_channel(address, as_=caller) as channel:
            with pytest.raises(aio.AioRpcError) as denied:
                await getattr(stub_type(channel), method)(request_, timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller
        assert error_reason(denied.value) == "CALLER_NOT_AUTHORIZED"
    async with mesh_channel(address, as_="payment-gateway") as channel:
        reply = await getattr(stub_type(channel), method)(request_, timeout=5)
    assert len(reply.results) == 1
