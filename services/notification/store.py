"""notification-service's data: one row per notification, its delivery state and its schedule.

The request id is claimed with the row's insert, so one request id is one notification for
ever; its id, derived from the request id, is the webhook's Idempotency-Key, so a re-attempt
after a lost answer is not a second event at the receiver. Each attempt updates the row: its
outcome, and for a failure the next attempt time the delivery loop waits for (a row of an
older version gains the new columns at start, and its PENDING rows become due).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Reason
from paymesh.notification.v1 import notification_pb2 as pb
from services.mesh.errors import FailedPrecondition, NotFound
from services.storage import idempotency
from services.storage.database import open_database, transaction

SEND_METHOD = "SendNotification"
REDELIVER_METHOD = "RedeliverNotification"

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    delivery_status INTEGER NOT NULL,
    attempt_count INTEGER NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    last_response_code INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_attempt_time REAL,
    create_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notifications_by_merchant
    ON notifications (merchant_id, create_time, notification_id);
"""
    + idempotency.SCHEMA
)
#: Columns added after the first version, with their definitions (added to an older table).
_ADDED_COLUMNS = {
    "next_attempt_time": "REAL",
    "dead_letter_time": "REAL",
    "round_start_time": "REAL",
    "round_failures": "INTEGER NOT NULL DEFAULT 0",
    "url_from_merchant": "INTEGER NOT NULL DEFAULT 0",
}
_DUE_INDEX = f"""
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (next_attempt_time)
    WHERE delivery_status = {pb.DELIVERY_STATUS_PENDING};
"""
#: Statuses RedeliverNotification refuses: there is nothing left to deliver.
_NOT_REDELIVERABLE = (pb.DELIVERY_STATUS_DELIVERED,)


def notification_id_for(request_id: str) -> str:
    """The notification id of a request id: deterministic, the receiver's dedupe key."""
    return "ntf_" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _notification(row: sqlite3.Row) -> pb.Notification:
    notification = pb.Notification(
        notification_id=row["notification_id"],
        request_id=row["request_id"],
        merchant_id=row["merchant_id"],
        event_type=row["event_type"],
        payload_json=row["payload_json"],
        webhook_url=row["webhook_url"],
        delivery_status=row["delivery_status"],
        attempt_count=row["attempt_count"],
        last_response_code=row["last_response_code"],
        last_error=row["last_error"],
        create_time=_timestamp(row["create_time"]),
    )
    for column in ("last_attempt_time", "next_attempt_time", "dead_letter_time"):
        if row[column] is not None:
            getattr(notification, column).CopyFrom(_timestamp(row[column]))
    return notification


@dataclass(frozen=True, slots=True)
class Delivery:
    """A notification with what its next attempt needs to know."""

    notification: pb.Notification
    """The notification as the API shows it."""
    url_from_merchant: bool
    """Whether the URL is the merchant's, looked up at each attempt (none was given)."""
    round_start_time: float
    """When the current round of attempts began (creation, or the last redelivery)."""
    round_failures: int
    """Failed attempts in the current round."""


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        notification=_notification(row),
        url_from_merchant=bool(row["url_from_merchant"]),
        round_start_time=row["round_start_time"] or row["create_time"],
        round_failures=row["round_failures"],
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt."""

    status: int
    """DeliveryStatus after it."""
    response_code: int
    """HTTP status received, 0 if none."""
    error: str
    """Why it failed or was skipped, empty if it was delivered."""
    webhook_url: str = ""
    """The URL it went to; empty keeps the stored one."""
    next_attempt_time: float | None = None
    """When to attempt again (PENDING only)."""
    counted: bool = True
    """Whether it counts as an attempt; a skip (no URL to try) does not."""


class NotificationStore:
    """Notifications in SQLite; one per request id."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock = clock
        self._upgrade()

    def _upgrade(self) -> None:
        """Add the columns an older version's table lacks; its PENDING rows become due now."""
        have = {info["name"] for info in self._conn.execute("PRAGMA table_info(notifications)")}
        missing = [name for name in _ADDED_COLUMNS if name not in have]
        if missing:
            with transaction(self._conn) as conn:
                for name in missing:
                    conn.execute(
                        f"ALTER TABLE notifications ADD COLUMN {name} {_ADDED_COLUMNS[name]}"
                    )
                conn.execute(
                    "UPDATE notifications SET next_attempt_time = ?"
                    " WHERE delivery_status = ? AND next_attempt_time IS NULL",
                    (self._clock(), pb.DELIVERY_STATUS_PENDING),
                )
        self._conn.executescript(_DUE_INDEX)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def record(self, request: pb.SendNotificationRequest) -> tuple[pb.Notification, bool]:
        """The notification of this request id, and whether it was inserted now.

        A new one is PENDING and due at once; a repeat of the request returns the latest
        state of the one recorded before.

        Raises:
            InvalidArgument: the request id was used with a different body.
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, SEND_METHOD, request.request_id, request)
            if claim.replay is not None:
                # The stored response is the first state; the row has the latest.
                row = conn.execute(
                    "SELECT * FROM notifications WHERE request_id = ?", (request.request_id,)
                ).fetchone()
                return _notification(row), False
            idempotency.refuse_if_kept(conn, "notifications", "request_id", request.request_id)
            notification_id = notification_id_for(request.request_id)
            now = self._clock()
            conn.execute(
                "INSERT INTO notifications (notification_id, request_id, merchant_id, event_type,"
                " payload_json, webhook_url, delivery_status, create_time, next_attempt_time,"
                " round_start_time, url_from_merchant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    notification_id,
                    request.request_id,
                    request.merchant_id,
                    request.event_type,
                    request.payload_json,
                    request.webhook_url,
                    pb.DELIVERY_STATUS_PENDING,
                    now,
                    now,
                    now,
                    int(not request.webhook_url),
                ),
            )
            notification = self.get(notification_id)
            idempotency.complete(
                conn,
                SEND_METHOD,
                request.request_id,
                pb.SendNotificationResponse(notification=notification),
            )
            return notification, True

    def delivery(self, notification_id: str) -> Delivery:
        """The notification with its schedule state; NotFound if there is none."""
        return _delivery(self._require(notification_id))

    def due(self, now: float, *, limit: int) -> list[Delivery]:
        """PENDING notifications whose next attempt is at or before ``now``, the most overdue
        first."""
        rows = self._conn.execute(
            "SELECT * FROM notifications WHERE delivery_status = ? AND next_attempt_time <= ?"
            " ORDER BY next_attempt_time, notification_id LIMIT ?",
            (pb.DELIVERY_STATUS_PENDING, now, limit),
        ).fetchall()
        return [_delivery(row) for row in rows]

    def record_attempt(self, notification_id: str, attempt: Attempt) -> pb.Notification:
        """Record one attempt's outcome; a DELIVERED notification stays DELIVERED."""
        now = self._clock()
        failed = attempt.status in (pb.DELIVERY_STATUS_PENDING, pb.DELIVERY_STATUS_DEAD_LETTERED)
        with transaction(self._conn) as conn:
            row = self._require(notification_id)
            if row["delivery_status"] == pb.DELIVERY_STATUS_DELIVERED:
                return _notification(row)
            conn.execute(
                "UPDATE notifications SET attempt_count = attempt_count + ?,"
                " round_failures = round_failures + ?, delivery_status = ?,"
                " next_attempt_time = ?, dead_letter_time = ?, last_response_code = ?,"
                " last_error = ?, last_attempt_time = COALESCE(?, last_attempt_time),"
                " webhook_url = COALESCE(NULLIF(?, ''), webhook_url)"
                " WHERE notification_id = ?",
                (
                    int(attempt.counted),
                    int(failed),
                    attempt.status,
                    attempt.next_attempt_time
                    if attempt.status == pb.DELIVERY_STATUS_PENDING
                    else None,
                    now if attempt.status == pb.DELIVERY_STATUS_DEAD_LETTERED else None,
                    attempt.response_code,
                    attempt.error,
                    now if attempt.counted else None,
                    attempt.webhook_url,
                    notification_id,
                ),
            )
            return _notification(self._require(notification_id))

    def redeliver(self, request: pb.RedeliverNotificationRequest) -> pb.Notification:
        """Start a new round of attempts, due now (idempotent by request id).

        Raises:
            NotFound: there is no such notification.
            FailedPrecondition: INVALID_STATE, it was delivered already; the request id
                stays free.
            InvalidArgument: the request id was used with a different body.
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, REDELIVER_METHOD, request.request_id, request)
            replay = idempotency.replayed(pb.RedeliverNotificationResponse, claim)
            if replay is not None:
                return replay.notification
            row = self._require(request.notification_id)
            if row["delivery_status"] in _NOT_REDELIVERABLE:
                raise FailedPrecondition(
                    f"notification {request.notification_id!r} was delivered already",
                    reason=Reason.INVALID_STATE,
                    metadata={
                        "notification_id": request.notification_id,
                        "delivery_status": pb.DeliveryStatus.Name(row["delivery_status"]),
                    },
                )
            now = self._clock()
            conn.execute(
                "UPDATE notifications SET delivery_status = ?, next_attempt_time = ?,"
                " round_start_time = ?, round_failures = 0, dead_letter_time = NULL"
                " WHERE notification_id = ?",
                (pb.DELIVERY_STATUS_PENDING, now, now, request.notification_id),
            )
            notification = _notification(self._require(request.notification_id))
            idempotency.complete(
                conn,
                REDELIVER_METHOD,
                request.request_id,
                pb.RedeliverNotificationResponse(notification=notification),
            )
            return notification

    def get(self, notification_id: str) -> pb.Notification:
        """The notification; NotFound if there is none."""
        return _notification(self._require(notification_id))

    def _require(self, notification_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM notifications WHERE notification_id = ?", (notification_id,)
        ).fetchone()
        if row is None:
            raise NotFound(
                f"notification {notification_id!r} does not exist",
                metadata={"notification_id": notification_id},
            )
        return row

    def list(
        self, *, merchant_id: str, status: int, before: tuple[float, str] | None, limit: int
    ) -> list[pb.Notification]:
        """A merchant's notifications newest first, before the ``(create_time, id)`` cursor."""
        clauses = ["merchant_id = ?"]
        params: list[object] = [merchant_id]
        if status:
            clauses.append("delivery_status = ?")
            params.append(status)
        if before is not None:
            clauses.append("(create_time, notification_id) < (?, ?)")
            params.extend(before)
        rows = self._conn.execute(
            f"SELECT * FROM notifications WHERE {' AND '.join(clauses)}"
            " ORDER BY create_time DESC, notification_id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_notification(row) for row in rows]
