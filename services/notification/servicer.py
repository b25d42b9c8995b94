"""notification-service RPCs: record a notification once per request id, deliver it signed.

Every webhook carries ``PayMesh-Signature`` (see ``signing``) made with the merchant's secrets,
which only this service holds; ``RotateWebhookSecret`` hands a new one out, once. Delivery goes
to the request's URL, or the merchant's (asked of merchant-service at each attempt), through
``delivery``'s checks (a refused URL in the request is INVALID_ARGUMENT); in development the
partner sandbox plays the merchants under ``.example``. The notification id is the
Idempotency-Key. SendNotification records the notification durably and makes the first
attempt, waiting for it a moment at most (a slow endpoint must not hold the caller); a
failure is recorded, not raised (the caller's payment must not fail because a merchant's
endpoint is down), and the delivery loop (``dispatch``) retries it with backoff until it is
delivered or dead-lettered. A repeat of a request id returns the notification's current
state and attempts nothing. SendNotifications does the same for up to 64 at once: one
transaction records them all, their first attempts run together within the same wait, and
each has its own result. ``RedeliverNotification`` lets an operator start a new
round of attempts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services.mesh import batch
from services.mesh import validation as v
from services.mesh.batch import ItemOutcome
from services.mesh.bootstrap import Context
from services.mesh.topology import Partner, Target
from services.notification import delivery
from services.notification.delivery import DestinationPolicy, RefusedDestination
from services.notification.dispatch import Dispatcher
from services.notification.secret_store import WebhookSecretStore
from services.notification.store import NotificationStore

MERCHANT_WEBHOOKS = Partner.MERCHANT_WEBHOOKS
#: ErrorInfo domain of a batch item's status, as of a failed call.
DOMAIN = Target.NOTIFICATION
#: Cap of a payload, as sent to us and as it appears in the signed body.
MAX_PAYLOAD_BYTES = 64 * 1024
#: Longest a previous secret may keep signing after a rotation.
MAX_OVERLAP_S = 24 * 3600
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class NotificationServicer(pb_grpc.NotificationServiceServicer):
    """Records, delivers, redelivers, reads and lists merchant notifications; rotates secrets."""

    def __init__(
        self,
        store: NotificationStore,
        secrets: WebhookSecretStore,
        dispatcher: Dispatcher,
        *,
        policy: DestinationPolicy,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._dispatcher = dispatcher
        self._policy = policy

    async def SendNotification(
        self, request: pb.SendNotificationRequest, context: Context
    ) -> pb.SendNotificationResponse:
        return (await self._send([request]))[0].unwrap()

    async def SendNotifications(
        self, request: pb.SendNotificationsRequest, context: Context
    ) -> pb.SendNotificationsResponse:
        batch.require_items("notifications", request.notifications)
        outcomes = await self._send(request.notifications)
        return pb.SendNotificationsResponse(
            results=batch.results(pb.SendNotificationResult, outcomes, domain=DOMAIN)
        )

    async def _send(
        self, requests: Sequence[pb.SendNotificationRequest]
    ) -> list[ItemOutcome[pb.SendNotificationResponse]]:
        """Record every valid request in one transaction, then make the new ones' first
        attempts together; one outcome per request."""
        outcomes = batch.apply_each(requests, self._check, self._store.record_each)
        new = [i for i, o in enumerate(outcomes) if o.error is None and not o.duplicate]
        attempted = await self._dispatcher.first_attempts(
            [
                (outcomes[i].unwrap().notification.notification_id, bool(requests[i].webhook_url))
                for i in new
            ]
        )
        for i, after in zip(new, attempted, strict=True):
            outcomes[i] = (
                ItemOutcome(error=v.invalid("webhook_url", str(after)))
                if isinstance(after, RefusedDestination)
                else ItemOutcome(pb.SendNotificationResponse(notification=after))
            )
        return outcomes

    def _check(self, request: pb.SendNotificationRequest) -> None:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        if not _EVENT_TYPE.match(request.event_type) or len(request.event_type) > 100:
            raise v.invalid(
                "event_type",
                f"{request.event_type[:100]!r} is not a dot-separated lower-case event type"
                " such as 'payment.succeeded'",
            )
        _require_payload(request.payload_json)
        if request.webhook_url:
            try:
                delivery.parse(request.webhook_url, self._policy)
            except RefusedDestination as exc:
                raise v.invalid("webhook_url", str(exc)) from None

    async def RedeliverNotification(
        self, request: pb.RedeliverNotificationRequest, context: Context
    ) -> pb.RedeliverNotificationResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("notification_id", request.notification_id)
        return pb.RedeliverNotificationResponse(notification=self._store.redeliver(request))

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.RotateWebhookSecretResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        overlap = request.previous_secret_overlap
        overlap_s = overlap.seconds + overlap.nanos / 1e9
        if overlap.seconds < 0 or overlap.nanos < 0 or overlap_s > MAX_OVERLAP_S:
            raise v.invalid(
                "previous_secret_overlap", f"must be between 0 and {MAX_OVERLAP_S} seconds"
            )
        return self._secrets.rotate(request, overlap_s=overlap_s)

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
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        found, next_token = v.page_of(
            self._store.list(
                merchant_id=request.merchant_id,
                status=request.delivery_status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.notification_id},
        )
        return pb.ListNotificationsResponse(notifications=found, next_page_token=next_token)


def _require_payload(payload_json: str) -> None:
    if len(payload_json.encode()) > MAX_PAYLOAD_BYTES:
        raise v.invalid("payload_json", f"exceeds {MAX_PAYLOAD_BYTES} bytes")
    try:
        payload = json.loads(payload_json)
    except (ValueError, RecursionError):
        raise v.invalid("payload_json", "is not valid JSON") from None
    if not isinstance(payload, dict):
        raise v.invalid("payload_json", "must be a JSON object")
    # The signed body re-encodes it (non-ASCII as \u escapes): the cap holds there too.
    if len(json.dumps(payload)) > MAX_PAYLOAD_BYTES:
        raise v.invalid("payload_json", f"exceeds {MAX_PAYLOAD_BYTES} bytes once encoded")
