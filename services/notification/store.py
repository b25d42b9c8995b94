"""notification-service's data: one row per notification with its delivery state.

The request id is claimed with the row's insert, so one request id is one notification for
ever; delivery attempts then update the row. The notification id is the webhook's
Idempotency-Key, so a re-attempt after a lost answer is not a second delivery.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import NotFound
from paymesh.notification.v1 import notification_pb2 as pb
from services import idempotency
from services.database import open_database, transaction

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
    if row["last_attempt_time"] is not None:
        notification.last_attempt_time.CopyFrom(_timestamp(row["last_attempt_time"]))
    return notification


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt."""

    status: int
    """DeliveryStatus after it."""
    response_code: int
    """HTTP status received, 0 if none."""
    error: str
    """Why it failed, empty if it did not."""


class NotificationStore:
    """Notifications in SQLite; one per request id."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock = clock

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def record(self, request: pb.SendNotificationRequest) -> pb.Notification:
        """The notification of this request id: inserted now, or the one recorded before.

        Raises:
            InvalidArgument: the request id was used with a different body.
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "SendNotification", request.request_id, request)
            if claim.replay is not None:
                # The stored response is the first state; the row has the latest.
                row = conn.execute(
                    "SELECT * FROM notifications WHERE request_id = ?", (request.request_id,)
                ).fetchone()
                return _notification(row)
            idempotency.refuse_if_kept(conn, "notifications", "request_id", request.request_id)
            notification_id = f"ntf_{uuid.uuid4().hex[:24]}"
            status = (
                pb.DELIVERY_STATUS_PENDING if request.webhook_url else pb.DELIVERY_STATUS_SKIPPED
            )
            conn.execute(
                "INSERT INTO notifications (notification_id, request_id, merchant_id, event_type,"
                " payload_json, webhook_url, delivery_status, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    notification_id,
                    request.request_id,
                    request.merchant_id,
                    request.event_type,
                    request.payload_json,
                    request.webhook_url,
                    status,
                    self._clock(),
                ),
            )
            notification = self.get(notification_id)
            idempotency.complete(
                conn,
                "SendNotification",
                request.request_id,
                pb.SendNotificationResponse(notification=notification),
            )
            return notification

    def record_attempt(self, notification_id: str, attempt: Attempt) -> pb.Notification:
        """Count one attempt and its outcome; a DELIVERED notification stays DELIVERED."""
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE notifications SET attempt_count = attempt_count + 1,"
                " delivery_status = CASE WHEN delivery_status = ? THEN delivery_status ELSE ? END,"
                " last_response_code = ?, last_error = ?, last_attempt_time = ?"
                " WHERE notification_id = ?",
                (
                    pb.DELIVERY_STATUS_DELIVERED,
                    attempt.status,
                    attempt.response_code,
                    attempt.error,
                    self._clock(),
                    notification_id,
                ),
            )
            return self.get(notification_id)

    def get(self, notification_id: str) -> pb.Notification:
        """The notification; NotFound if there is none."""
        row = self._conn.execute(
            "SELECT * FROM notifications WHERE notification_id = ?", (notification_id,)
        ).fetchone()
        if row is None:
            raise NotFound(
                f"notification {notification_id!r} does not exist",
                metadata={"notification_id": notification_id},
            )
        return _notification(row)

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
