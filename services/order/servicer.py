"""order-service RPCs: validate, then read or write the service's own store."""

from __future__ import annotations

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh import validation as v
from services.mesh.bootstrap import Context
from services.order.store import OrderStore


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    """Creates, reads, lists and updates orders."""

    def __init__(self, store: OrderStore) -> None:
        self._store = store

    async def CreateOrder(
        self, request: order_pb2.CreateOrderRequest, context: Context
    ) -> order_pb2.CreateOrderResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("order_id", request.order_id)
        v.require_id("merchant_id", request.merchant_id)
        v.require_id("payment_id", request.payment_id)
        v.require_amount("amount", request.amount)
        v.optional_text("merchant_order_reference", request.merchant_order_reference)
        v.optional_text("description", request.description)
        return order_pb2.CreateOrderResponse(order=self._store.create(request))

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        v.require_id("order_id", request.order_id)
        return order_pb2.GetOrderResponse(order=self._store.get(request.order_id))

    async def ListOrders(
        self, request: order_pb2.ListOrdersRequest, context: Context
    ) -> order_pb2.ListOrdersResponse:
        if request.merchant_id:
            v.require_id("merchant_id", request.merchant_id)
        if request.status not in order_pb2.OrderStatus.values():
            raise v.invalid("status", f"{request.status} is not an OrderStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id, "status": request.status}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        orders, next_token = v.page_of(
            self._store.list(
                merchant_id=request.merchant_id,
                status=request.status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.order_id},
        )
        return order_pb2.ListOrdersResponse(orders=orders, next_page_token=next_token)

    async def UpdateOrderStatus(
        self, request: order_pb2.UpdateOrderStatusRequest, context: Context
    ) -> order_pb2.UpdateOrderStatusResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("order_id", request.order_id)
        if request.status == order_pb2.ORDER_STATUS_UNSPECIFIED or (
            request.status not in order_pb2.OrderStatus.values()
        ):
            raise v.invalid("status", "must be a concrete OrderStatus")
        v.optional_text("reason", request.reason)
        return order_pb2.UpdateOrderStatusResponse(order=self._store.update_status(request))
