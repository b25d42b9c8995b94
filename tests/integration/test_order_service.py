"""order-service through real gRPC on loopback: idempotent writes, paging, precise errors,
and status changes that follow the order lifecycle (any other is FAILED_PRECONDITION)."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.order.__main__ import build
from tests.servers import ServicesUnderTest, error_reason


@pytest.fixture
async def orders(services: ServicesUnderTest) -> order_pb2_grpc.OrderServiceAsyncStub:
    return await services.serve("order-service", build, order_pb2_grpc.OrderServiceStub)


def _create(request_id: str, order_id: str, amount: int = 1250) -> order_pb2.CreateOrderRequest:
    return order_pb2.CreateOrderRequest(
        request_id=request_id,
        order_id=order_id,
        merchant_id="m_1",
        payment_id=f"pay_{order_id}",
        amount=common_pb2.Money(amount_minor=amount, currency_code="EUR"),
    )


async def test_replayed_create_returns_the_first_order(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    first = await orders.CreateOrder(_create("r1", "o1"))
    again = await orders.CreateOrder(_create("r1", "o1"))
    assert again.order == first.order
    listed = await orders.ListOrders(order_pb2.ListOrdersRequest(merchant_id="m_1"))
    assert len(listed.orders) == 1


async def test_same_order_id_with_different_content_is_already_exists(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    await orders.CreateOrder(_create("r1", "o1"))
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.CreateOrder(_create("r2", "o1", amount=999))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_request_id_reused_with_another_body_is_invalid_argument(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    await orders.CreateOrder(_create("r1", "o1"))
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.CreateOrder(_create("r1", "o2"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different request body" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("amount", "currency"), [(0, "EUR"), (-1, "EUR"), (10**15, "EUR"), (100, "XXX")]
)
async def test_bad_money_is_invalid_argument(
    orders: order_pb2_grpc.OrderServiceAsyncStub, amount: int, currency: str
) -> None:
    request = _create("r1", "o1")
    request.amount.amount_minor = amount
    request.amount.currency_code = currency
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.CreateOrder(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_order_is_not_found(orders: order_pb2_grpc.OrderServiceAsyncStub) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.GetOrder(order_pb2.GetOrderRequest(order_id="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pages_list_every_order_once_newest_first(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    # Ids out of creation order, so an id-ordered or oldest-first listing cannot pass.
    created = [f"o{(index * 3) % 7}" for index in range(7)]  # o0 o3 o6 o2 o5 o1 o4
    for index, order_id in enumerate(created):
        await orders.CreateOrder(_create(f"r{index}", order_id))
    seen: list[str] = []
    token = ""
    while True:
        page = await orders.ListOrders(
            order_pb2.ListOrdersRequest(merchant_id="m_1", page_size=3, page_token=token)
        )
        seen.extend(o.order_id for o in page.orders)
        token = page.next_page_token
        if not token:
            break
    assert seen == created[::-1]


async def test_page_token_of_another_filter_is_rejected(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    for index in range(3):
        await orders.CreateOrder(_create(f"r{index}", f"o{index}"))
    page = await orders.ListOrders(order_pb2.ListOrdersRequest(merchant_id="m_1", page_size=1))
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.ListOrders(
            order_pb2.ListOrdersRequest(merchant_id="m_2", page_token=page.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the order lifecycle ----------------------------------------------------------------


def _status(
    request_id: str, status: order_pb2.OrderStatus.ValueType, order_id: str = "o1"
) -> order_pb2.UpdateOrderStatusRequest:
    return order_pb2.UpdateOrderStatusRequest(
        request_id=request_id, order_id=order_id, status=status, reason="test"
    )


async def _walk(
    orders: order_pb2_grpc.OrderServiceAsyncStub, *statuses: order_pb2.OrderStatus.ValueType
) -> order_pb2.Order:
    """Create order o1 and move it through ``statuses``; the order after the last."""
    order = (await orders.CreateOrder(_create("create", "o1"))).order
    for index, status in enumerate(statuses):
        order = (await orders.UpdateOrderStatus(_status(f"walk-{index}", status))).order
    return order


async def test_paid_order_is_refunded_in_parts_then_wholly(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    order = await _walk(
        orders,
        order_pb2.ORDER_STATUS_PAID,
        order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED,
        order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED,
        order_pb2.ORDER_STATUS_REFUNDED,
    )
    assert order.status == order_pb2.ORDER_STATUS_REFUNDED


async def test_setting_the_current_status_again_is_a_no_op(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    paid = await _walk(orders, order_pb2.ORDER_STATUS_PAID)
    again = await orders.UpdateOrderStatus(_status("again", order_pb2.ORDER_STATUS_PAID))
    assert again.order.status == paid.status == order_pb2.ORDER_STATUS_PAID


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        (
            (order_pb2.ORDER_STATUS_PAID, order_pb2.ORDER_STATUS_REFUNDED),
            order_pb2.ORDER_STATUS_PAID,
        ),
        ((), order_pb2.ORDER_STATUS_REFUNDED),
        ((), order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED),
        ((order_pb2.ORDER_STATUS_CANCELLED,), order_pb2.ORDER_STATUS_PAID),
        ((order_pb2.ORDER_STATUS_PAID,), order_pb2.ORDER_STATUS_CANCELLED),
        ((order_pb2.ORDER_STATUS_PAID,), order_pb2.ORDER_STATUS_CREATED),
        (
            (order_pb2.ORDER_STATUS_PAID, order_pb2.ORDER_STATUS_REFUNDED),
            order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED,
        ),
        (
            (order_pb2.ORDER_STATUS_PAID, order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED),
            order_pb2.ORDER_STATUS_PAID,
        ),
    ],
    ids=[
        "refunded-to-paid",
        "created-to-refunded",
        "created-to-partially-refunded",
        "cancelled-to-paid",
        "paid-to-cancelled",
        "paid-to-created",
        "refunded-to-partially-refunded",
        "partially-refunded-to-paid",
    ],
)
async def test_change_outside_the_lifecycle_is_failed_precondition_invalid_state(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
    path: tuple[order_pb2.OrderStatus.ValueType, ...],
    refused: order_pb2.OrderStatus.ValueType,
) -> None:
    before = await _walk(orders, *path)
    with pytest.raises(aio.AioRpcError) as caught:
        await orders.UpdateOrderStatus(_status("bad", refused))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "INVALID_STATE"
    after = await orders.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    assert after.order == before


async def test_refused_change_leaves_its_request_id_free(
    orders: order_pb2_grpc.OrderServiceAsyncStub,
) -> None:
    await _walk(orders)
    with pytest.raises(aio.AioRpcError):
        await orders.UpdateOrderStatus(_status("r-upd", order_pb2.ORDER_STATUS_REFUNDED))
    paid = await orders.UpdateOrderStatus(_status("r-upd", order_pb2.ORDER_STATUS_PAID))
    assert paid.order.status == order_pb2.ORDER_STATUS_PAID
