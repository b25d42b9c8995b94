"""order-service's data: one row per order, keyed by the caller-chosen order id.

A status change is checked against the order's lifecycle (``lifecycle``) inside the write
transaction, so two concurrent updates cannot both pass the check on a stale status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from services.mesh.batch import ItemOutcome
from services.mesh.errors import AlreadyExists, NotFound
from services.order import lifecycle
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, seconds_to_ns, timestamp

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    status INTEGER NOT NULL,
    merchant_order_reference TEXT NOT NULL,
    description TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_merchant ON orders (merchant_id, create_time_ns, order_id);
"""
    + idempotency.SCHEMA
)
#: The request ids' namespace, one for UpdateOrderStatus and each item of UpdateOrderStatuses.
UPDATE_STATUS_METHOD = "UpdateOrderStatus"


def _order(row: Row) -> order_pb2.Order:
    return order_pb2.Order(
        order_id=row["order_id"],
        merchant_id=row["merchant_id"],
        payment_id=row["payment_id"],
        amount=common_pb2.Money(
            amount_minor=row["amount_minor"], currency_code=row["currency_code"]
        ),
        status=row["status"],
        merchant_order_reference=row["merchant_order_reference"],
        description=row["description"],
        status_reason=row["status_reason"],
        create_time=timestamp(row["create_time_ns"]),
        update_time=timestamp(row["update_time_ns"]),
    )


class OrderStore:
    """Orders on the store base; every write is idempotent by its request id and order id.

    Args:
        clock: seconds since the epoch (tests pass their own); stored as nanoseconds.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def create(self, request: order_pb2.CreateOrderRequest) -> order_pb2.Order:
        """Insert the order, or return it again for a replay of the same request."""

        def run(tx: Statements) -> order_pb2.CreateOrderResponse:
            existing = self._row(tx, request.order_id)
            if existing is not None:
                order = _order(existing)
                if (order.merchant_id, order.payment_id, order.amount) != (
                    request.merchant_id,
                    request.payment_id,
                    request.amount,
                ):
                    raise AlreadyExists(
                        f"order {request.order_id!r} exists with different content",
                        metadata={"order_id": request.order_id},
                    )
                return order_pb2.CreateOrderResponse(order=order)
            now = self._db.clock_ns()
            tx.insert(
                "orders",
                {
                    "order_id": request.order_id,
                    "merchant_id": request.merchant_id,
                    "payment_id": request.payment_id,
                    "amount_minor": request.amount.amount_minor,
                    "currency_code": request.amount.currency_code,
                    "status": order_pb2.ORDER_STATUS_CREATED,
                    "merchant_order_reference": request.merchant_order_reference,
                    "description": request.description,
                    "create_time_ns": now,
                    "update_time_ns": now,
                },
            )
            return order_pb2.CreateOrderResponse(order=_order(self._require(tx, request.order_id)))

        return self._db.idempotent("CreateOrder", request, order_pb2.CreateOrderResponse, run).order

    def update_status(self, request: order_pb2.UpdateOrderStatusRequest) -> order_pb2.Order:
        """Set the order's status: :meth:`update_statuses` of one, its error raised."""
        return self.update_statuses([request])[0].unwrap().order

    def update_statuses(
        self, requests: Sequence[order_pb2.UpdateOrderStatusRequest]
    ) -> list[ItemOutcome[order_pb2.UpdateOrderStatusResponse]]:
        """Set each order's status in one transaction, in order (idempotent by request id;
        the same status twice is a no-op); one outcome per request.

        An item fails with NotFound (there is no such order) or FailedPrecondition
        (INVALID_STATE, the lifecycle does not allow the change; its request id stays free).
        """
        return self._db.idempotent_each(
            UPDATE_STATUS_METHOD, requests, order_pb2.UpdateOrderStatusResponse, self._set_status
        )

    def _set_status(
        self, tx: Statements, request: order_pb2.UpdateOrderStatusRequest
    ) -> order_pb2.UpdateOrderStatusResponse:
        current = self._require(tx, request.order_id)["status"]
        lifecycle.require_transition(request.order_id, current, request.status)
        tx.update(
            "orders",
            {
                "status": request.status,
                "status_reason": request.reason,
                "update_time_ns": self._db.clock_ns(),
            },
            order_id=request.order_id,
        )
        order = _order(self._require(tx, request.order_id))
        return order_pb2.UpdateOrderStatusResponse(order=order)

    def get(self, order_id: str) -> order_pb2.Order:
        """The order; NotFound if there is none."""
        return _order(self._require(self._db, order_id))

    def list(
        self, *, merchant_id: str, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[order_pb2.Order]:
        """Orders newest first, filtered, past the ``(create_time_ns, order_id)`` cursor."""
        where: dict[str, object] = {}
        if merchant_id:
            where["merchant_id"] = merchant_id
        if status:
            where["status"] = status
        rows = self._db.page(
            "orders", order=("create_time_ns", "order_id"), cursor=before, limit=limit, where=where
        )
        return [_order(row) for row in rows]

    @staticmethod
    def _row(db: Statements, order_id: str) -> Row | None:
        return db.one("SELECT * FROM orders WHERE order_id = ?", (order_id,))

    def _require(self, db: Statements, order_id: str) -> Row:
        row = self._row(db, order_id)
        if row is None:
            raise NotFound(f"order {order_id!r} does not exist", metadata={"order_id": order_id})
        return row
