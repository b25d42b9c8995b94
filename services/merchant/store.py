"""merchant-service's data: one row per merchant, keyed by a server-generated merchant id."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

from interceptors.errors import Reason
from paymesh.merchant.v1 import merchant_pb2
from services.mesh.errors import NotFound
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, timestamp

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS merchants (
    merchant_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    country_code TEXT NOT NULL,
    default_currency_code TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    status INTEGER NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS merchants_newest ON merchants (create_time_ns, merchant_id);
CREATE INDEX IF NOT EXISTS merchants_by_status
    ON merchants (status, create_time_ns, merchant_id);
"""
    + idempotency.SCHEMA
)


def new_merchant_id() -> str:
    """A fresh merchant id: ``m_`` and 64 random bits, so ids reveal neither count nor order."""
    return f"m_{secrets.token_hex(8)}"


def _merchant(row: Row) -> merchant_pb2.Merchant:
    return merchant_pb2.Merchant(
        merchant_id=row["merchant_id"],
        name=row["name"],
        email=row["email"],
        country_code=row["country_code"],
        default_currency_code=row["default_currency_code"],
        webhook_url=row["webhook_url"],
        status=row["status"],
        status_reason=row["status_reason"],
        create_time=timestamp(row["create_time_ns"]),
        update_time=timestamp(row["update_time_ns"]),
    )


def not_found(merchant_id: str) -> NotFound:
    """The error of an unknown merchant id."""
    return NotFound(
        f"merchant {merchant_id!r} does not exist",
        reason=Reason.MERCHANT_NOT_FOUND,
        metadata={"merchant_id": merchant_id},
    )


class MerchantStore:
    """Merchants on the store base; every write is idempotent by its request id."""

    def __init__(
        self,
        path: Path | str,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        new_id: Callable[[], str] = new_merchant_id,
    ) -> None:
        self._db = Database(path, SCHEMA, clock_ns=clock_ns)
        self._new_id = new_id

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def create(self, request: merchant_pb2.CreateMerchantRequest) -> merchant_pb2.Merchant:
        """Insert a new ACTIVE merchant, or return the first one again for a replayed request."""

        def run(tx: Statements) -> merchant_pb2.CreateMerchantResponse:
            merchant_id = self._new_id()
            now = self._db.clock_ns()
            tx.insert(
                "merchants",
                {
                    "merchant_id": merchant_id,
                    "name": request.name,
                    "email": request.email,
                    "country_code": request.country_code,
                    "default_currency_code": request.default_currency_code,
                    "webhook_url": request.webhook_url,
                    "status": merchant_pb2.MERCHANT_STATUS_ACTIVE,
                    "create_time_ns": now,
                    "update_time_ns": now,
                },
            )
            merchant = _merchant(self._require(merchant_id))
            return merchant_pb2.CreateMerchantResponse(merchant=merchant)

        return self._db.idempotent(
            "CreateMerchant", request, merchant_pb2.CreateMerchantResponse, run
        ).merchant

    def update_status(
        self, request: merchant_pb2.UpdateMerchantStatusRequest
    ) -> merchant_pb2.Merchant:
        """Set the merchant's status; setting the status it already has changes nothing."""

        def run(tx: Statements) -> merchant_pb2.UpdateMerchantStatusResponse:
            current = _merchant(self._require(request.merchant_id))
            # A repeated suspension (another request id, same target state) must not move
            # update_time or overwrite the reason the status was first changed for.
            if current.status != request.status:
                tx.update(
                    "merchants",
                    {
                        "status": request.status,
                        "status_reason": request.reason,
                        "update_time_ns": self._db.clock_ns(),
                    },
                    merchant_id=request.merchant_id,
                )
                current = _merchant(self._require(request.merchant_id))
            return merchant_pb2.UpdateMerchantStatusResponse(merchant=current)

        return self._db.idempotent(
            "UpdateMerchantStatus", request, merchant_pb2.UpdateMerchantStatusResponse, run
        ).merchant

    def get(self, merchant_id: str) -> merchant_pb2.Merchant:
        """The merchant; NotFound (MERCHANT_NOT_FOUND) if there is none."""
        return _merchant(self._require(merchant_id))

    def list(
        self, *, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[merchant_pb2.Merchant]:
        """Merchants newest first, filtered, starting below the ``(create_time_ns, id)`` cursor."""
        rows = self._db.page(
            "merchants",
            order=("create_time_ns", "merchant_id"),
            cursor=before,
            limit=limit,
            where={"status": status} if status else {},
        )
        return [_merchant(row) for row in rows]

    def _require(self, merchant_id: str) -> Row:
        row = self._db.one("SELECT * FROM merchants WHERE merchant_id = ?", (merchant_id,))
        if row is None:
            raise not_found(merchant_id)
        return row
