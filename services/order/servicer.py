"""order-service RPCs: validate, then read or write the service's own store."""

from __future__ import annotations

from collections.abc import Sequence

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh import batch
from services.mesh import validation as v
from services.mesh.batch import ItemOutcome
from services.mesh.bootstrap import Context
from services.mesh.topology import Target
from services.order.store import OrderStore

#: ErrorInfo domain of a batch item's status, as of a failed call.
DOMAIN = Target.ORDER


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
        return self._update([request])[0].unwrap()

    async def UpdateOrderStatuses(
        self, request: order_pb2.UpdateOrderStatusesRequest, context: Context
    ) -> order_pb2.UpdateOrderStatusesResponse:
        batch.require_items("updates", request.updates)
        outcomes = self._update(request.updates)
        return order_pb2.UpdateOrderStatusesResponse(
            results=batch.results(order_pb2.UpdateOrderStatusResult, outcomes, domain=DOMAIN)
        )

    def _update(
        self, requests: Sequence[order_pb2.UpdateOrderStatusRequest]
    ) -> list[ItemOutcome[order_pb2.UpdateOrderStatusResponse]]:
        return batch.apply_each(requests, _check_update, self._store.update_statuses)


def _check_update(request: order_pb2.UpdateOrderStatusRequest) -> None:
    v.require_request_id("request_id", request.request_id)
    v.require_id("order_id", request.order_id)
    if request.status == order_pb2.ORDER_STATUS_UNSPECIFIED or (
        request.status not in order_pb2.OrderStatus.values()
    ):
        raise v.invalid("status", "must be a concrete OrderStatus")
    v.optional_text("reason", request.reason)
