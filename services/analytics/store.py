"""analytics-service's data: one row per event, keyed by the request id it was recorded with.

The request id is claimed in the same transaction as the insert and is the event's primary
key, so a replayed event is never counted twice. Statistics are integer SQL sums and counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from paymesh.analytics.v1 import analytics_pb2
from paymesh.common.v1 import common_pb2
from services.mesh.batch import ItemOutcome
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, timestamp

SUCCEEDED = analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED
DECLINED = analytics_pb2.EVENT_TYPE_PAYMENT_DECLINED
FAILED = analytics_pb2.EVENT_TYPE_PAYMENT_FAILED
REFUNDED = analytics_pb2.EVENT_TYPE_PAYMENT_REFUNDED
#: The request ids' namespace, one for RecordEvent and each event of RecordEvents.
RECORD_METHOD = "RecordEvent"

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    event_type INTEGER NOT NULL,
    payment_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor >= 0),
    currency_code TEXT NOT NULL,
    occur_time_ns INTEGER NOT NULL,
    create_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_merchant ON events (merchant_id, occur_time_ns, event_id);
CREATE INDEX IF NOT EXISTS events_by_merchant_type
    ON events (merchant_id, event_type, occur_time_ns, event_id);
"""
    + idempotency.SCHEMA
)


def _money(amount_minor: int, currency_code: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency_code=currency_code)


def _event(row: Row | Mapping[str, Any]) -> analytics_pb2.Event:
    return analytics_pb2.Event(
        event_id=row["event_id"],
        merchant_id=row["merchant_id"],
        event_type=row["event_type"],
        payment_id=row["payment_id"],
        amount=_money(row["amount_minor"], row["currency_code"]),
        occur_time=timestamp(row["occur_time_ns"]),
        create_time=timestamp(row["create_time_ns"]),
    )


def success_rate_bps(succeeded: int, declined: int, failed: int) -> int:
    """Succeeded over attempted payments in basis points, rounded down; 0 with no attempts.

    Rounding down in integers means a rate is never shown better than it is (9999 of 10000
    attempts is 9999 bps, not 10000).
    """
    attempted = succeeded + declined + failed
    return 0 if attempted == 0 else succeeded * 10_000 // attempted


class EventStore:
    """Events on the store base; recording is idempotent by the request id (the event id)."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._db = Database(path, SCHEMA, clock_ns=clock_ns)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def record(self, request: analytics_pb2.RecordEventRequest) -> analytics_pb2.Event:
        """Insert the event, or return it again for a replay of the same request."""
        return self.record_each([request])[0].unwrap().event

    def record_each(
        self, requests: Sequence[analytics_pb2.RecordEventRequest]
    ) -> list[ItemOutcome[analytics_pb2.RecordEventResponse]]:
        """Insert each event in one transaction (a replay returns the first response); one
        outcome per request, in order."""
        return self._db.idempotent_each(
            RECORD_METHOD,
            requests,
            analytics_pb2.RecordEventResponse,
            self._insert,
            kept_in=("events", "event_id"),
        )

    def _insert(
        self, tx: Statements, request: analytics_pb2.RecordEventRequest
    ) -> analytics_pb2.RecordEventResponse:
        now = self._db.clock_ns()
        occur = request.occur_time.ToNanoseconds() if request.HasField("occur_time") else now
        event = {
            "event_id": request.request_id,
            "merchant_id": request.merchant_id,
            "event_type": request.event_type,
            "payment_id": request.payment_id,
            "amount_minor": request.amount.amount_minor,
            "currency_code": request.amount.currency_code,
            "occur_time_ns": occur,
            "create_time_ns": now,
        }
        tx.insert("events", event)
        # The reply is what was written; reading the row back would say the same.
        return analytics_pb2.RecordEventResponse(event=_event(event))

    def stats(self, merchant_id: str, *, since_ns: int | None) -> analytics_pb2.MerchantStats:
        """The merchant's counts, volumes and success rate over events at or after ``since_ns``."""
        where = "merchant_id = ?"
        params: list[object] = [merchant_id]
        if since_ns is not None:
            where += " AND occur_time_ns >= ?"
            params.append(since_ns)
        totals = self._db.aggregate(
            f"""SELECT COUNT(*) AS events,
                       COUNT(*) FILTER (WHERE event_type = {SUCCEEDED}) AS succeeded,
                       COUNT(*) FILTER (WHERE event_type = {DECLINED}) AS declined,
                       COUNT(*) FILTER (WHERE event_type = {FAILED}) AS failed,
                       COUNT(*) FILTER (WHERE event_type = {REFUNDED}) AS refunded,
                       MIN(occur_time_ns) AS first_ns, MAX(occur_time_ns) AS last_ns
                FROM events WHERE {where}""",
            params,
        )
        volumes = self._db.all(
            f"""SELECT currency_code,
                       SUM(CASE WHEN event_type = {SUCCEEDED} THEN amount_minor ELSE 0 END)
                           AS succeeded_minor,
                       SUM(CASE WHEN event_type = {REFUNDED} THEN amount_minor ELSE 0 END)
                           AS refunded_minor
                FROM events WHERE {where} AND event_type IN ({SUCCEEDED}, {REFUNDED})
                GROUP BY currency_code ORDER BY currency_code""",
            params,
        )
        stats = analytics_pb2.MerchantStats(
            merchant_id=merchant_id,
            event_count=totals["events"],
            succeeded_count=totals["succeeded"],
            declined_count=totals["declined"],
            failed_count=totals["failed"],
            refunded_count=totals["refunded"],
            success_rate_bps=success_rate_bps(
                totals["succeeded"], totals["declined"], totals["failed"]
            ),
            volumes=[
                analytics_pb2.CurrencyVolume(
                    currency_code=row["currency_code"],
                    succeeded_volume=_money(row["succeeded_minor"], row["currency_code"]),
                    refunded_volume=_money(row["refunded_minor"], row["currency_code"]),
                )
                for row in volumes
            ],
        )
        if totals["first_ns"] is not None:
            stats.first_event_time.CopyFrom(timestamp(totals["first_ns"]))
            stats.last_event_time.CopyFrom(timestamp(totals["last_ns"]))
        return stats

    def list(
        self, *, merchant_id: str, event_type: int, before: tuple[int, str] | None, limit: int
    ) -> list[analytics_pb2.Event]:
        """The merchant's events newest first, before the ``(occur_time_ns, event_id)`` cursor."""
        where: dict[str, object] = {"merchant_id": merchant_id}
        if event_type:
            where["event_type"] = event_type
        rows = self._db.page(
            "events",
            order=("occur_time_ns", "event_id"),
            cursor=before,
            limit=limit,
            where=where,
        )
        return [_event(row) for row in rows]
