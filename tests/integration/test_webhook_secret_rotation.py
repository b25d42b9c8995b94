"""A merchant rotates its webhook signing secret through merchant-service's public port.

merchant-service authenticates the API key at merchant-auth-service, then asks
notification-service, which alone holds the secrets: the merchant gets the new secret once,
for its own id only, and the next webhook verifies with it and not with the previous one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from services.merchant.__main__ import build as build_merchant
from services.notification import signing
from services.notification.__main__ import build as build_notification
from tests.integration.merchant_auth_mesh import (
    auth_service,
    create_merchant,
    issue_request,
    merchant_service,
)
from tests.integration.webhook_receiver import (
    ReceivedWebhook,
    WebhookReceiver,
    receiving_webhooks,
)
from tests.servers import bearer, granted_stub, public_channel, running_sandbox, running_service


@dataclass
class Door:
    """merchant-service's public port, the notifier behind it and a merchant with its key."""

    public: merchant_pb2_grpc.MerchantServiceAsyncStub
    notifications: notification_pb2_grpc.NotificationServiceAsyncStub
    receiver: WebhookReceiver
    merchant_id: str
    api_key: str
    other_merchant_id: str

    async def rotate(
        self, request_id: str, merchant_id: str = ""
    ) -> merchant_pb2.RotateWebhookSecretResponse:
        """RotateWebhookSecret with the merchant's API key, for ``merchant_id`` (empty: own)."""
        return await self.public.RotateWebhookSecret(
            merchant_pb2.RotateWebhookSecretRequest(request_id=request_id, merchant_id=merchant_id),
            metadata=bearer(self.api_key),
            timeout=10,
        )

    async def deliver(self, request_id: str) -> ReceivedWebhook:
        """Send a webhook to the merchant's endpoint; what the endpoint received."""
        await self.notifications.SendNotification(
            notification_pb2.SendNotificationRequest(
                request_id=request_id,
                merchant_id=self.merchant_id,
                event_type="payment.succeeded",
                payload_json='{"payment_id": "pay_1"}',
                webhook_url=self.receiver.url(),
            )
        )
        with self.receiver.lock:
            return self.receiver.received[-1]


@contextlib.asynccontextmanager
async def _door(var_dir: Path) -> AsyncIterator[Door]:
    # merchant-auth asks one merchant-service; the door is a second one over the same data.
    async with (
        merchant_service(var_dir) as (merchant_address, merchants),
        auth_service(merchant_address, var_dir) as (auth, auth_address),
    ):
        merchant = await create_merchant(merchants, "m1")
        other = await create_merchant(merchants, "m2")
        key = await auth.IssueApiKey(issue_request(merchant.merchant_id))
        with running_sandbox() as (sandbox, _), receiving_webhooks() as receiver:
            base = {"PAYMESH_VAR_DIR": str(var_dir), "PARTNER_SANDBOX_ADDR": sandbox}
            async with running_service(
                "notification-service", build_notification, environ=base
            ) as notifier:
                door_env = {
                    **base,
                    "MERCHANT_AUTH_SERVICE_ADDR": auth_address,
                    "NOTIFICATION_SERVICE_ADDR": str(notifier),
                }
                async with (
                    running_service("merchant-service", build_merchant, environ=door_env) as door,
                    public_channel(door.public) as channel,
                    granted_stub(
                        notifier,
                        notification_pb2_grpc.NotificationServiceStub,
                        "notification-service",
                    ) as notifications,
                ):
                    yield Door(
                        merchant_pb2_grpc.MerchantServiceStub(channel),
                        notifications,
                        receiver,
                        merchant.merchant_id,
                        key.secret,
                        other.merchant_id,
                    )


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    async with _door(tmp_path) as made:
        yield made


async def test_merchant_rotates_its_secret_and_webhooks_verify_with_the_new_one(
    door: Door,
) -> None:
    old = (await door.rotate("rot1")).secret
    rotated = await door.rotate("rot2")
    assert rotated.secret.startswith("whsec_") and rotated.secret != old
    assert rotated.webhook_secret.merchant_id == door.merchant_id
    webhook = await door.deliver("n1")
    header = webhook.headers["paymesh-signature"]
    signing.verify(rotated.secret, header, webhook.body, time.time())
    with pytest.raises(signing.SignatureError):
        signing.verify(old, header, webhook.body, time.time())


async def test_replayed_rotation_does_not_reveal_the_secret_again(door: Door) -> None:
    first = await door.rotate("rot1")
    again = await door.rotate("rot1")
    assert first.secret and again.secret == ""
    assert again.webhook_secret == first.webhook_secret


async def test_merchant_cannot_rotate_another_merchants_secret(door: Door) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await door.rotate("rot1", merchant_id=door.other_merchant_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_rotation_without_an_api_key_is_refused(door: Door) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await door.public.RotateWebhookSecret(
            merchant_pb2.RotateWebhookSecretRequest(request_id="rot1"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
