"""notification-service RPCs: record a notification once per request id and deliver it.

Delivery goes to the merchant-webhooks partner with the notification id as Idempotency-Key.
A failed attempt is recorded on the notification (PENDING, then FAILED after
``max_attempts``), not raised: the caller's payment must not fail because a merchant's
endpoint is down. Sending the same request id again re-attempts only what is undelivered.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from interceptors.errors import Unavailable
from interceptors.http import PartnerClient
from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services import validation as v
from services.bootstrap import Context
from services.notification.store import Attempt, NotificationStore
from services.partner import call_partner

MERCHANT_WEBHOOKS = "merchant-webhooks"
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_URL_LENGTH = 2048
DEFAULT_MAX_ATTEMPTS = 5
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: Statuses a repeated SendNotification delivers again.
UNDELIVERED = (pb.DELIVERY_STATUS_PENDING, pb.DELIVERY_STATUS_FAILED)


class NotificationServicer(pb_grpc.NotificationServiceServicer):
    """Records, delivers, reads and lists merchant notifications."""

    def __init__(
        self,
        store: NotificationStore,
        webhooks: PartnerClient,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._max_attempts = max_attempts
        # Notifications being delivered in this process: a concurrent duplicate waits
        # for nothing and sends nothing, it answers with the state so far.
        self._delivering: set[str] = set()

    async def SendNotification(
        self, request: pb.SendNotificationRequest, context: Context
    ) -> pb.SendNotificationResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        if not _EVENT_TYPE.match(request.event_type) or len(request.event_type) > 100:
            raise v.invalid(
                "event_type",
                f"{request.event_type[:100]!r} is not a dot-separated lower-case event type"
                " such as 'payment.succeeded'",
            )
        _require_payload(request.payload_json)
        _require_url(request.webhook_url)

        notification = self._store.record(request)
        if (
            notification.delivery_status in UNDELIVERED
            and notification.notification_id not in self._delivering
        ):
            notification = await self._deliver(notification)
        return pb.SendNotificationResponse(notification=notification)

    async def _deliver(self, notification: pb.Notification) -> pb.Notification:
        self._delivering.add(notification.notification_id)
        try:
            try:
                status, body = await call_partner(
                    self._webhooks,
                    "POST",
                    "/deliver",
                    json={
                        "notification_id": notification.notification_id,
                        "merchant_id": notification.merchant_id,
                        "event_type": notification.event_type,
                        "webhook_url": notification.webhook_url,
                        "payload": json.loads(notification.payload_json),
                    },
                    idempotency_key=notification.notification_id,
                )
            except Unavailable as exc:
                attempt = self._failed(notification, 0, exc.message)
            else:
                if 200 <= status < 300:
                    attempt = Attempt(pb.DELIVERY_STATUS_DELIVERED, status, "")
                else:
                    attempt = self._failed(notification, status, f"webhook answered {body!r}")
            return self._store.record_attempt(notification.notification_id, attempt)
        finally:
            self._delivering.discard(notification.notification_id)

    def _failed(self, notification: pb.Notification, code: int, error: str) -> Attempt:
        given_up = notification.attempt_count + 1 >= self._max_attempts
        status = pb.DELIVERY_STATUS_FAILED if given_up else pb.DELIVERY_STATUS_PENDING
        return Attempt(status, code, error[:500])

    async def GetNotification(
        self, request: pb.GetNotificationRequest, context: Context
    ) -> pb.GetNotificationResponse:
        v.require_id("notification_id", request.notification_id)
        return pb.GetNotificationResponse(notification=self._store.get(request.notification_id))

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Context
    ) -> pb.ListNotificationsResponse:
        v.require_id("merchant_id", request.merchant_id)
        if request.delivery_status not in pb.DeliveryStatus.values():
            raise v.invalid("delivery_status", f"{request.delivery_status} is not a DeliveryStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id, "status": request.delivery_status}
        before = v.page_position(request.page_token, filters, v.SECONDS_AND_ID)
        found, next_token = v.page_of(
            self._store.list(
                merchant_id=request.merchant_id,
                status=request.delivery_status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds() / 1e9, "id": last.notification_id},
        )
        return pb.ListNotificationsResponse(notifications=found, next_page_token=next_token)


def _require_payload(payload_json: str) -> None:
    if len(payload_json.encode()) > MAX_PAYLOAD_BYTES:
        raise v.invalid("payload_json", f"exceeds {MAX_PAYLOAD_BYTES} bytes")
    try:
        payload = json.loads(payload_json)
    except ValueError:
        raise v.invalid("payload_json", "is not valid JSON") from None
    if not isinstance(payload, dict):
        raise v.invalid("payload_json", "must be a JSON object")


def _require_url(url: str) -> None:
    if not url:
        return
    if len(url) > MAX_URL_LENGTH:
        raise v.invalid("webhook_url", f"is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise v.invalid("webhook_url", f"{url[:100]!r} is not an http(s) URL")
