"""analytics-service's data: one row per event, keyed by the request id it was recorded with.

The request id is claimed in the same transaction as the insert and is the event's primary
key, so a replayed event is never counted twice. Statistics are integer SQL sums and counts.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.analytics.v1 import analytics_pb2
from paymesh.common.v1 import common_pb2
from services.storage import idempotency
from services.storage.database import open_database, transaction

SUCCEEDED = analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED
DECLINED = analytics_pb2.EVENT_TYPE_PAYMENT_DECLINED
FAILED = analytics_pb2.EVENT_TYPE_PAYMENT_FAILED
REFUNDED = analytics_pb2.EVENT_TYPE_PAYMENT_REFUNDED

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


def _timestamp(nanoseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    return stamp


def _money(amount_minor: int, currency_code: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency_code=currency_code)


def _event(row: sqlite3.Row) -> analytics_pb2.Event:
    return analytics_pb2.Event(
        event_id=row["event_id"],
        merchant_id=row["merchant_id"],
        event_type=row["event_type"],
        payment_id=row["payment_id"],
        amount=_money(row["amount_minor"], row["currency_code"]),
        occur_time=_timestamp(row["occur_time_ns"]),
        create_time=_timestamp(row["create_time_ns"]),
    )


def success_rate_bps(succeeded: int, declined: int, failed: int) -> int:
    """Succeeded over attempted payments in basis points, rounded down; 0 with no attempts.

    Rounding down in integers means a rate is never shown better than it is (9999 of 10000
    attempts is 9999 bps, not 10000).
    """
    attempted = succeeded + declined + failed
    return 0 if attempted == 0 else succeeded * 10_000 // attempted


class EventStore:
    """Events in SQLite; recording is idempotent by the request id (the event id)."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock_ns = clock_ns

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def record(self, request: analytics_pb2.RecordEventRequest) -> analytics_pb2.Event:
        """Insert the event, or return it again for a replay of the same request."""
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "RecordEvent", request.request_id, request)
            replay = idempotency.replayed(analytics_pb2.RecordEventResponse, claim)
            if replay is not None:
                return replay.event
            idempotency.refuse_if_kept(conn, "events", "event_id", request.request_id)
            now = self._clock_ns()
            occur = request.occur_time.ToNanoseconds() if request.HasField("occur_time") else now
            conn.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.request_id,
                    request.merchant_id,
                    request.event_type,
                    request.payment_id,
                    request.amount.amount_minor,
                    request.amount.currency_code,
                    occur,
                    now,
                ),
            )
            event = _event(
                conn.execute(
                    "SELECT * FROM events WHERE event_id = ?", (request.request_id,)
                ).fetchone()
            )
            idempotency.complete(
                conn,
                "RecordEvent",
                request.request_id,
                analytics_pb2.RecordEventResponse(event=event),
            )
            return event

    def stats(self, merchant_id: str, *, since_ns: int | None) -> analytics_pb2.MerchantStats:
        """The merchant's counts, volumes and success rate over events at or after ``since_ns``."""
        where = "merchant_id = ?"
        params: list[object] = [merchant_id]
        if since_ns is not None:
            where += " AND occur_time_ns >= ?"
            params.append(since_ns)
        totals = self._conn.execute(
            f"""SELECT COUNT(*) AS events,
                       COUNT(*) FILTER (WHERE event_type = {SUCCEEDED}) AS succeeded,
                       COUNT(*) FILTER (WHERE event_type = {DECLINED}) AS declined,
                       COUNT(*) FILTER (WHERE event_type = {FAILED}) AS failed,
                       COUNT(*) FILTER (WHERE event_type = {REFUNDED}) AS refunded,
                       MIN(occur_time_ns) AS first_ns, MAX(occur_time_ns) AS last_ns
                FROM events WHERE {where}""",
            params,
        ).fetchone()
        volumes = self._conn.execute(
            f"""SELECT currency_code,
                       SUM(CASE WHEN event_type = {SUCCEEDED} THEN amount_minor ELSE 0 END)
                           AS succeeded_minor,
                       SUM(CASE WHEN event_type = {REFUNDED} THEN amount_minor ELSE 0 END)
                           AS refunded_minor
                FROM events WHERE {where} AND event_type IN ({SUCCEEDED}, {REFUNDED})
                GROUP BY currency_code ORDER BY currency_code""",
            params,
        ).fetchall()
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
            stats.first_event_time.CopyFrom(_timestamp(totals["first_ns"]))
            stats.last_event_time.CopyFrom(_timestamp(totals["last_ns"]))
        return stats

    def list(
        self, *, merchant_id: str, event_type: int, before: tuple[int, str] | None, limit: int
    ) -> list[analytics_pb2.Event]:
        """The merchant's events newest first, before the ``(occur_time_ns, event_id)`` cursor."""
        where = "merchant_id = ?"
        params: list[object] = [merchant_id]
        if event_type:
            where += " AND event_type = ?"
            params.append(event_type)
        if before is not None:
            where += " AND (occur_time_ns, event_id) < (?, ?)"
            params.extend(before)
        rows = self._conn.execute(
            f"SELECT * FROM events WHERE {where}"
            " ORDER BY occur_time_ns DESC, event_id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_event(row) for row in rows]
