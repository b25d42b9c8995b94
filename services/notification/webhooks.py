"""One signed POST of a notification to a merchant's webhook, and what the endpoint answered.

The body is the event envelope; ``PayMesh-Signature`` signs it with the merchant's secrets and
``Idempotency-Key`` is the notification id, the same on every attempt, so the receiver can
dedupe retries. A ``.example`` host in development is played by the partner sandbox (through
the policy chain); any other URL is posted to directly through ``delivery``'s checks.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from interceptors.codes import http_code
from interceptors.deadline import DeadlineExhausted, outgoing_deadline
from interceptors.errors import CallError
from interceptors.http import PartnerClient
from interceptors.telemetry import CallRecord
from paymesh.notification.v1 import notification_pb2 as pb
from services.notification import delivery, signing
from services.notification.delivery import Destination, DestinationPolicy
from services.notification.secret_store import WebhookSecretStore

USER_AGENT = "PayMesh-Webhooks/1"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True, slots=True)
class Reply:
    """What one POST achieved."""

    response_code: int
    """HTTP status received, 0 if none."""
    error: str
    """Why it failed; empty exactly when the endpoint answered 2xx."""


def envelope(notification: pb.Notification) -> dict[str, Any]:
    """The webhook body: what happened, to whom, and the event's own payload."""
    return {
        "notification_id": notification.notification_id,
        "merchant_id": notification.merchant_id,
        "event_type": notification.event_type,
        "payload": json.loads(notification.payload_json),
    }


class WebhookSender:
    """Signs and posts notifications; never raises for an endpoint's failure, only reports it.

    Args:
        secrets: the merchants' signing secrets.
        webhooks: the sandbox stand-in's client; its target policy (timeout) governs direct
            posts too.
        policy: where webhooks may go.
        resolver: DNS for webhook hosts.
        tls: TLS context of direct https posts (None: the system's defaults).
        client: the HTTP client of direct posts, keeping their connections (None: a new one
            per post).
        clock: the signature's time.
    """

    def __init__(
        self,
        secrets: WebhookSecretStore,
        webhooks: PartnerClient,
        *,
        policy: DestinationPolicy,
        resolver: delivery.Resolver = delivery.system_resolver,
        tls: ssl.SSLContext | None = None,
        client: delivery.DeliveryClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = secrets
        self._webhooks = webhooks
        self._policy = policy
        self._resolver = resolver
        self._tls = tls
        self._client = client
        self._clock = clock

    async def send(self, notification: pb.Notification, destination: Destination) -> Reply:
        """POST the notification to ``destination`` once.

        Raises:
            RefusedDestination: the host resolves to an address no delivery may reach.
        """
        body_json = envelope(notification)
        # json.dumps with defaults: the very bytes PartnerClient sends for json=body_json.
        body = json.dumps(body_json).encode()
        secrets = self._secrets.signing_secrets(notification.merchant_id)
        headers = {
            signing.HEADER: signing.signature_header(secrets, body, int(self._clock())),
            "User-Agent": USER_AGENT,
        }
        if delivery.played_by_sandbox(destination, self._policy):
            return await self._via_sandbox(notification, body_json, headers)
        return await self._direct(notification, destination, body, headers)

    async def _via_sandbox(
        self, notification: pb.Notification, body: Mapping[str, Any], headers: dict[str, str]
    ) -> Reply:
        try:
            status, answer = await self._webhooks.request(
                "POST",
                "/deliver",
                json=body,
                idempotency_key=notification.notification_id,
                headers=headers,
            )
        except CallError as exc:
            partner = self._webhooks.partner
            return Reply(0, f"partner {partner} is unavailable: {exc.details()}")
        return _answered(status, repr(answer))

    async def _direct(
        self,
        notification: pb.Notification,
        destination: Destination,
        body: bytes,
        headers: dict[str, str],
    ) -> Reply:
        runtime = self._webhooks.runtime
        policy = runtime.config.target_policy(self._webhooks.partner)
        started = runtime.clock()
        sent = {
            **headers,
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: notification.notification_id,
        }
        timeout_s = policy.timeout_s
        try:
            timeout_s = outgoing_deadline(
                policy.timeout_s, margin_s=policy.deadline_margin_s, clock=runtime.clock
            ).timeout_s
            async with asyncio.timeout(timeout_s):
                addresses = await delivery.resolve(destination, self._policy, self._resolver)
                answer = await delivery.post(
                    destination, addresses, body, sent, tls=self._tls, client=self._client
                )
        except delivery.RefusedDestination:
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
            return Reply(0, f"webhook {destination.host}: {error}")
        return _answered(answer.status, repr(answer.excerpt))


def _answered(status: int, answer: str) -> Reply:
    if 200 <= status < 300:
        return Reply(status, "")
    return Reply(status, f"webhook answered {status}: {answer}")
