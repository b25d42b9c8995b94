"""notification-service RPCs: record a notification once per request id, deliver it signed.

Every webhook carries ``PayMesh-Signature`` (see ``signing``) made with the merchant's secrets,
which only this service holds; ``RotateWebhookSecret`` hands a new one out, once. Delivery goes
to the merchant's URL through ``delivery``'s checks (a refused URL is INVALID_ARGUMENT); in
development the partner sandbox plays the merchants under ``.example``. The notification id is
the Idempotency-Key. A failed attempt is recorded on the notification (PENDING, then FAILED
after ``max_attempts``), not raised: the caller's payment must not fail because a merchant's
endpoint is down. Sending the same request id again re-attempts only what is undelivered.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from interceptors.deadline import DeadlineExhausted, outgoing_deadline
from interceptors.errors import CallError
from interceptors.http import PartnerClient, http_code
from interceptors.telemetry import CallRecord
from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services import validation as v
from services.bootstrap import Context
from services.notification import delivery, signing
from services.notification.delivery import Destination, DestinationPolicy, RefusedDestination
from services.notification.secret_store import WebhookSecretStore
from services.notification.store import Attempt, NotificationStore

MERCHANT_WEBHOOKS = "merchant-webhooks"
#: Cap of a payload, as sent to us and as it appears in the signed body.
MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_MAX_ATTEMPTS = 5
#: Longest a previous secret may keep signing after a rotation.
MAX_OVERLAP_S = 24 * 3600
USER_AGENT = "PayMesh-Webhooks/1"
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: Statuses a repeated SendNotification delivers again.
UNDELIVERED = (pb.DELIVERY_STATUS_PENDING, pb.DELIVERY_STATUS_FAILED)


class NotificationServicer(pb_grpc.NotificationServiceServicer):
    """Records, signs, delivers, reads and lists merchant notifications; rotates secrets."""

    def __init__(
        self,
        store: NotificationStore,
        secrets: WebhookSecretStore,
        webhooks: PartnerClient,
        *,
        policy: DestinationPolicy,
        resolver: delivery.Resolver = delivery.system_resolver,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self._store = store
        self._secrets = secrets
        # The sandbox stand-in's client; its target policy (timeout) governs direct posts too.
        self._webhooks = webhooks
        self._policy = policy
        self._resolver = resolver
        self._tls = tls
        self._clock = clock
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
        destination = self._destination(request.webhook_url)

        notification = self._store.record(request)
        if (
            destination is not None
            and notification.delivery_status in UNDELIVERED
            and notification.notification_id not in self._delivering
        ):
            notification = await self._deliver(notification, destination)
        return pb.SendNotificationResponse(notification=notification)

    def _destination(self, url: str) -> Destination | None:
        if not url:
            return None
        try:
            return delivery.parse(url, self._policy)
        except RefusedDestination as exc:
            raise v.invalid("webhook_url", str(exc)) from None

    async def _deliver(
        self, notification: pb.Notification, destination: Destination
    ) -> pb.Notification:
        notification_id = notification.notification_id
        self._delivering.add(notification_id)
        try:
            envelope = _envelope(notification)
            # json.dumps with defaults: the very bytes PartnerClient sends for json=envelope.
            body = json.dumps(envelope).encode()
            secrets = self._secrets.signing_secrets(notification.merchant_id)
            headers = {
                signing.HEADER: signing.signature_header(secrets, body, int(self._clock())),
                "User-Agent": USER_AGENT,
            }
            try:
                if delivery.played_by_sandbox(destination, self._policy):
                    attempt = await self._via_sandbox(notification, envelope, headers)
                else:
                    attempt = await self._direct(notification, destination, body, headers)
            except RefusedDestination as exc:
                refused = Attempt(pb.DELIVERY_STATUS_FAILED, 0, f"refused: {exc}"[:500])
                self._store.record_attempt(notification_id, refused)
                raise v.invalid("webhook_url", str(exc)) from None
            return self._store.record_attempt(notification_id, attempt)
        finally:
            self._delivering.discard(notification_id)

    async def _via_sandbox(
        self, notification: pb.Notification, envelope: Mapping[str, Any], headers: dict[str, str]
    ) -> Attempt:
        try:
            status, answer = await self._webhooks.request(
                "POST",
                "/deliver",
                json=envelope,
                idempotency_key=notification.notification_id,
                headers=headers,
            )
        except CallError as exc:
            partner = self._webhooks.partner
            return self._failed(
                notification, 0, f"partner {partner} is unavailable: {exc.details()}"
            )
        return self._answered(notification, status, repr(answer))

    async def _direct(
        self,
        notification: pb.Notification,
        destination: Destination,
        body: bytes,
        headers: dict[str, str],
    ) -> Attempt:
        runtime = self._webhooks.runtime
        policy = runtime.config.target_policy(self._webhooks.partner)
        started = runtime.clock()
        sent = {
            **headers,
            "Content-Type": "application/json",
            "Idempotency-Key": notification.notification_id,
        }
        try:
            timeout_s = outgoing_deadline(
                policy.timeout_s, margin_s=policy.deadline_margin_s, clock=runtime.clock
            ).timeout_s
            async with asyncio.timeout(timeout_s):
                addresses = await delivery.resolve(destination, self._policy, self._resolver)
                answer = await delivery.post(destination, addresses, body, sent, tls=self._tls)
        except RefusedDestination:
            raise
        except DeadlineExhausted:
            code, error = "DEADLINE_EXCEEDED", "the caller's deadline left no time to deliver"
        except TimeoutError:
            code, error = "DEADLINE_EXCEEDED", f"no answer within {timeout_s:.1f} s"
        except (OSError, ValueError, EOFError) as exc:
            code, error = "UNAVAILABLE", f"{type(exc).__name__}: {exc}"
        else:
            code, error = http_code(answer.status), ""
        runtime.telemetry.record_call(
            CallRecord(
                target=self._webhooks.partner,
                method="POST webhook",
                code=code,
                duration_s=runtime.clock() - started,
                error=error,
            )
        )
        if error:
            return self._failed(notification, 0, f"webhook {destination.host}: {error}")
        return self._answered(notification, answer.status, repr(answer.excerpt))

    def _answered(self, notification: pb.Notification, status: int, answer: str) -> Attempt:
        if 200 <= status < 300:
            return Attempt(pb.DELIVERY_STATUS_DELIVERED, status, "")
        return self._failed(notification, status, f"webhook answered {answer}")

    def _failed(self, notification: pb.Notification, code: int, error: str) -> Attempt:
        given_up = notification.attempt_count + 1 >= self._max_attempts
        status = pb.DELIVERY_STATUS_FAILED if given_up else pb.DELIVERY_STATUS_PENDING
        return Attempt(status, code, error[:500])

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


def _envelope(notification: pb.Notification) -> dict[str, Any]:
    """The webhook body: what happened, to whom, and the event's own payload."""
    return {
        "notification_id": notification.notification_id,
        "merchant_id": notification.merchant_id,
        "event_type": notification.event_type,
        "payload": json.loads(notification.payload_json),
    }


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
