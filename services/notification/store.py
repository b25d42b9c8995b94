"""notification-service's data: one row per notification, its delivery state and its schedule.

The request id is claimed with the row's insert, so one request id is one notification for
ever; its id, derived from the request id, is the webhook's Idempotency-Key, so a re-attempt
after a lost answer is not a second event at the receiver. Each attempt updates the row: its
outcome, and for a failure the next attempt time the delivery loop waits for (a row of an
older version is upgraded at open, and its PENDING rows become due). Times are stored in
nanoseconds; this module's callers schedule in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from interceptors.errors import Reason
from paymesh.notification.v1 import notification_pb2 as pb
from services.mesh.batch import ItemOutcome
from services.mesh.errors import FailedPrecondition, NotFound
from services.storage import idempotency
from services.storage.sql import (
    Database,
    Row,
    Statements,
    ns_to_seconds,
    seconds_to_ns,
    timestamp,
)

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
    last_attempt_time_ns INTEGER,
    create_time_ns INTEGER NOT NULL,
    next_attempt_time_ns INTEGER,
    dead_letter_time_ns INTEGER,
    round_start_time_ns INTEGER,
    round_failures INTEGER NOT NULL DEFAULT 0,
    url_from_merchant INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS notifications_by_merchant
    ON notifications (merchant_id, create_time_ns, notification_id);
"""
    + f"""
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (next_attempt_time_ns)
    WHERE delivery_status = {pb.DELIVERY_STATUS_PENDING};
"""
    + idempotency.SCHEMA
)
#: Statuses RedeliverNotification refuses: there is nothing left to deliver.
_NOT_REDELIVERABLE = (pb.DELIVERY_STATUS_DELIVERED,)


def notification_id_for(request_id: str) -> str:
    """The notification id of a request id: deterministic, the receiver's dedupe key."""
    return "ntf_" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def _notification(row: Row) -> pb.Notification:
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
        create_time=timestamp(row["create_time_ns"]),
    )
    for field in ("last_attempt_time", "next_attempt_time", "dead_letter_time"):
        if row[f"{field}_ns"] is not None:
            getattr(notification, field).CopyFrom(timestamp(row[f"{field}_ns"]))
    return notification


def _set_time(notification: pb.Notification, field: str, nanos: int | None) -> None:
    """Set a time field as :func:`_notification` reads the column (``None`` leaves it unset)."""
    if nanos is None:
        notification.ClearField(field)  # type: ignore[arg-type]
    else:
        getattr(notification, field).CopyFrom(timestamp(nanos))


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


def _delivery(row: Row) -> Delivery:
    return Delivery(
        notification=_notification(row),
        url_from_merchant=bool(row["url_from_merchant"]),
        round_start_time=ns_to_seconds(row["round_start_time_ns"] or row["create_time_ns"]),
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
    """Notifications, one per request id.

    Args:
        clock: seconds since the epoch (the delivery loop's clock; tests pass their own).
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))
        with self._db.transaction() as tx:
            # Rows of a version before the schedule have no next attempt: due now.
            tx.run(
                "UPDATE notifications SET next_attempt_time_ns = ?"
                " WHERE delivery_status = ? AND next_attempt_time_ns IS NULL",
                (self._db.clock_ns(), pb.DELIVERY_STATUS_PENDING),
            )

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def record_each(
        self, requests: Sequence[pb.SendNotificationRequest]
    ) -> list[ItemOutcome[pb.SendNotificationResponse]]:
        """The notification of each request id, in one transaction; one outcome per request.

        A new one is PENDING and due at once; a repeat of a request (a duplicate outcome)
        carries the latest state of the one recorded before. An item fails with
        InvalidArgument when its request id was used with a different body.
        """
        outcomes = self._db.idempotent_each(
            SEND_METHOD,
            requests,
            pb.SendNotificationResponse,
            self._insert,
            kept_in=("notifications", "request_id"),
        )
        # A replay's stored response is the first state; the row has the latest.
        return [
            dataclasses.replace(outcome, response=self._latest(outcome.response))
            if outcome.duplicate and outcome.response is not None
            else outcome
            for outcome in outcomes
        ]

    def _insert(
        self, tx: Statements, request: pb.SendNotificationRequest
    ) -> pb.SendNotificationResponse:
        notification_id = notification_id_for(request.request_id)
        now = self._db.clock_ns()
        tx.insert(
            "notifications",
            {
                "notification_id": notification_id,
                "request_id": request.request_id,
                "merchant_id": request.merchant_id,
                "event_type": request.event_type,
                "payload_json": request.payload_json,
                "webhook_url": request.webhook_url,
                "delivery_status": pb.DELIVERY_STATUS_PENDING,
                "create_time_ns": now,
                "next_attempt_time_ns": now,
                "round_start_time_ns": now,
                "url_from_merchant": int(not request.webhook_url),
            },
        )
        # The row just written, from its values (the columns not named take defaults).
        notification = pb.Notification(
            notification_id=notification_id,
            request_id=request.request_id,
            merchant_id=request.merchant_id,
            event_type=request.event_type,
            payload_json=request.payload_json,
            webhook_url=request.webhook_url,
            delivery_status=pb.DELIVERY_STATUS_PENDING,
            create_time=timestamp(now),
            next_attempt_time=timestamp(now),
        )
        return pb.SendNotificationResponse(notification=notification)

    def _latest(self, first: pb.SendNotificationResponse) -> pb.SendNotificationResponse:
        latest = self.get(first.notification.notification_id)
        return pb.SendNotificationResponse(notification=latest)

    def delivery(self, notification_id: str) -> Delivery:
        """The notification with its schedule state; NotFound if there is none."""
        return _delivery(self._require(notification_id))

    def due(self, now: float, *, limit: int) -> list[Delivery]:
        """PENDING notifications whose next attempt is at or before ``now``, the most overdue
        first."""
        rows = self._db.all(
            "SELECT * FROM notifications WHERE delivery_status = ? AND next_attempt_time_ns <= ?"
            " ORDER BY next_attempt_time_ns, notification_id LIMIT ?",
            (pb.DELIVERY_STATUS_PENDING, seconds_to_ns(now), limit),
        )
        return [_delivery(row) for row in rows]

    def record_attempt(self, notification_id: str, attempt: Attempt) -> pb.Notification:
        """Record one attempt's outcome; a DELIVERED notification stays DELIVERED."""
        now = self._db.clock_ns()
        failed = attempt.status in (pb.DELIVERY_STATUS_PENDING, pb.DELIVERY_STATUS_DEAD_LETTERED)
        next_attempt_ns = (
            seconds_to_ns(attempt.next_attempt_time)
            if attempt.status == pb.DELIVERY_STATUS_PENDING
            and attempt.next_attempt_time is not None
            else None
        )
        dead_letter_ns = now if attempt.status == pb.DELIVERY_STATUS_DEAD_LETTERED else None
        with self._db.transaction() as tx:
            row = self._require(notification_id)
            notification = _notification(row)
            if row["delivery_status"] == pb.DELIVERY_STATUS_DELIVERED:
                return notification
            tx.run(
                "UPDATE notifications SET attempt_count = attempt_count + ?,"
                " round_failures = round_failures + ?, delivery_status = ?,"
                " next_attempt_time_ns = ?, dead_letter_time_ns = ?, last_response_code = ?,"
                " last_error = ?, last_attempt_time_ns = COALESCE(?, last_attempt_time_ns),"
                " webhook_url = COALESCE(NULLIF(?, ''), webhook_url)"
                " WHERE notification_id = ?",
                (
                    int(attempt.counted),
                    int(failed),
                    attempt.status,
                    next_attempt_ns,
                    dead_letter_ns,
                    attempt.response_code,
                    attempt.error,
                    now if attempt.counted else None,
                    attempt.webhook_url,
                    notification_id,
                ),
            )
        # The row as the update left it, without reading it back.
        notification.attempt_count += int(attempt.counted)
        notification.delivery_status = pb.DeliveryStatus.ValueType(attempt.status)
        _set_time(notification, "next_attempt_time", next_attempt_ns)
        _set_time(notification, "dead_letter_time", dead_letter_ns)
        notification.last_response_code = attempt.response_code
        notification.last_error = attempt.error
        if attempt.counted:
            _set_time(notification, "last_attempt_time", now)
        if attempt.webhook_url:
            notification.webhook_url = attempt.webhook_url
        return notification

    def redeliver(self, request: pb.RedeliverNotificationRequest) -> pb.Notification:
        """Start a new round of attempts, due now (idempotent by request id).

        Raises:
            NotFound: there is no such notification.
            FailedPrecondition: INVALID_STATE, it was delivered already; the request id
                stays free.
            InvalidArgument: the request id was used with a different body.
        """

        def run(tx: Statements) -> pb.RedeliverNotificationResponse:
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
            now = self._db.clock_ns()
            tx.run(
                "UPDATE notifications SET delivery_status = ?, next_attempt_time_ns = ?,"
                " round_start_time_ns = ?, round_failures = 0, dead_letter_time_ns = NULL"
                " WHERE notification_id = ?",
                (pb.DELIVERY_STATUS_PENDING, now, now, request.notification_id),
            )
            # The row as the update left it, without reading it back.
            notification = _notification(row)
            notification.delivery_status = pb.DELIVERY_STATUS_PENDING
            _set_time(notification, "next_attempt_time", now)
            _set_time(notification, "dead_letter_time", None)
            return pb.RedeliverNotificationResponse(notification=notification)

        return self._db.idempotent(
            REDELIVER_METHOD, request, pb.RedeliverNotificationResponse, run
        ).notification

    def get(self, notification_id: str) -> pb.Notification:
        """The notification; NotFound if there is none."""
        return _notification(self._require(notification_id))

    def _require(self, notification_id: str) -> Row:
        row = self._db.one(
            "SELECT * FROM notifications WHERE notification_id = ?", (notification_id,)
        )
        if row is None:
            raise NotFound(
                f"notification {notification_id!r} does not exist",
                metadata={"notification_id": notification_id},
            )
        return row

    def list(
        self, *, merchant_id: str, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[pb.Notification]:
        """A merchant's notifications newest first, before the ``(create_time_ns, id)`` cursor."""
        where: dict[str, object] = {"merchant_id": merchant_id}
        if status:
            where["delivery_status"] = status
        rows = self._db.page(
            "notifications",
            order=("create_time_ns", "notification_id"),
            cursor=before,
            limit=limit,
            where=where,
        )
        return [_notification(row) for row in rows]
