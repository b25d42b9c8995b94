"""order-service's data: one row per order, keyed by the caller-chosen order id.

A status change is checked against the order's lifecycle (``lifecycle``) inside the write
transaction, so two concurrent updates cannot both pass the check on a stale status.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from services.mesh.errors import AlreadyExists, NotFound
from services.order import lifecycle
from services.storage import idempotency
from services.storage.database import open_database, transaction

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
    create_time REAL NOT NULL,
    update_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_merchant ON orders (merchant_id, create_time, order_id);
"""
    + idempotency.SCHEMA
)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _order(row: sqlite3.Row) -> order_pb2.Order:
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
        create_time=_timestamp(row["create_time"]),
        update_time=_timestamp(row["update_time"]),
    )


class OrderStore:
    """Orders in SQLite; every write is idempotent by its request id and order id."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock = clock

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def create(self, request: order_pb2.CreateOrderRequest) -> order_pb2.Order:
        """Insert the order, or return it again for a replay of the same request."""
        with transaction(self._conn) as conn:
            claim = idempotency.claim(
                conn, "CreateOrder", request.request_id, request, now=self._clock()
            )
            replay = idempotency.replayed(order_pb2.CreateOrderResponse, claim)
            if replay is not None:
                return replay.order
            existing = self._row(request.order_id)
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
            else:
                now = self._clock()
                conn.execute(
                    "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                    (
                        request.order_id,
                        request.merchant_id,
                        request.payment_id,
                        request.amount.amount_minor,
                        request.amount.currency_code,
                        order_pb2.ORDER_STATUS_CREATED,
                        request.merchant_order_reference,
                        request.description,
                        now,
                        now,
                    ),
                )
                order = _order(self._require(request.order_id))
            idempotency.complete(
                conn, "CreateOrder", request.request_id, order_pb2.CreateOrderResponse(order=order)
            )
            return order

    def update_status(self, request: order_pb2.UpdateOrderStatusRequest) -> order_pb2.Order:
        """Set the order's status (idempotent by request id; the same status twice is a no-op).

        Raises:
            NotFound: there is no such order.
            FailedPrecondition: INVALID_STATE, the lifecycle does not allow the change; the
                request id stays free (nothing was written).
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(
                conn, "UpdateOrderStatus", request.request_id, request, now=self._clock()
            )
            replay = idempotency.replayed(order_pb2.UpdateOrderStatusResponse, claim)
            if replay is not None:
                return replay.order
            current = self._require(request.order_id)["status"]
            lifecycle.require_transition(request.order_id, current, request.status)
            conn.execute(
                "UPDATE orders SET status=?, status_reason=?, update_time=? WHERE order_id=?",
                (request.status, request.reason, self._clock(), request.order_id),
            )
            order = _order(self._require(request.order_id))
            idempotency.complete(
                conn,
                "UpdateOrderStatus",
                request.request_id,
                order_pb2.UpdateOrderStatusResponse(order=order),
            )
            return order

    def get(self, order_id: str) -> order_pb2.Order:
        """The order; NotFound if there is none."""
        return _order(self._require(order_id))

    def list(
        self, *, merchant_id: str, status: int, after: tuple[float, str] | None, limit: int
    ) -> list[order_pb2.Order]:
        """Orders oldest first, filtered, starting after the ``(create_time, order_id)`` cursor."""
        clauses: list[str] = ["1=1"]
        params: list[object] = []
        if merchant_id:
            clauses.append("merchant_id = ?")
            params.append(merchant_id)
        if status:
            clauses.append("status = ?")
            params.append(status)
        if after is not None:
            clauses.append("(create_time, order_id) > (?, ?)")
            params.extend(after)
        rows = self._conn.execute(
            f"SELECT * FROM orders WHERE {' AND '.join(clauses)}"
            " ORDER BY create_time, order_id LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_order(row) for row in rows]

    def _row(self, order_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        return row

    def _require(self, order_id: str) -> sqlite3.Row:
        row = self._row(order_id)
        if row is None:
            raise NotFound(f"order {order_id!r} does not exist", metadata={"order_id": order_id})
        return row
