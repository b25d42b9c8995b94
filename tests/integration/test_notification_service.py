"""notification-service through real gRPC on loopback, delivering to real HTTP endpoints.

One request id is one notification, one Idempotency-Key and, once delivered, no further
attempt; a failed delivery is recorded on the notification with its next attempt time, and
the delivery loop retries it (a repeated request id attempts nothing). A notification without
a URL goes to the merchant's, asked of a real merchant-service. Every webhook is signed with
the merchant's secret (checked here with the verifier merchants use); a URL that may not be
reached (link-local, metadata, and in production private or plain http) is refused before
anything is sent. Merchants under ``.example`` are played by the partner sandbox; every other
URL is a test endpoint reached directly. Retries over days, dead letters and redelivery are
in ``test_webhook_durability``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services.merchant.__main__ import build as build_merchant
from services.mesh import pki
from services.mesh.tls import CA_FILE_VAR, CERT_FILE_VAR, KEY_FILE_VAR
from services.notification import signing
from services.notification.__main__ import build
from services.notification.config import INLINE_WAIT_VAR, SECRETS_KEY_FILE_VAR
from services.notification.store import notification_id_for
from services.tools.sandbox.app import Fault, SandboxState
from tests import servers
from tests.integration.webhook_receiver import FixedDns, WebhookReceiver, receiving_webhooks
from tests.servers import ServicesUnderTest, services_under_test

NAME = "notification-service"
T = TypeVar("T")
#: Enough for any first attempt on loopback: the answer to SendNotification is its outcome.
SETTLED_FIRST_ATTEMPT = {INLINE_WAIT_VAR: "10"}
#: Names under .test exist only here: what notification-service's resolver answers for them.
DNS = {
    "hooks.merchant.test": [["127.0.0.1"]],
    "rebind.merchant.test": [["127.0.0.1"], ["169.254.169.254"]],
    "linklocal.merchant.test": [["169.254.10.20"]],
    "private.merchant.test": [["10.0.0.7"]],
    "mixed.merchant.test": [["93.184.215.14", "10.0.0.7"]],
}


@dataclass
class Notifier:
    stub: pb_grpc.NotificationServiceAsyncStub
    state: SandboxState
    receiver: WebhookReceiver
    dns: FixedDns
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub

    async def merchant(self, webhook_url: str = "") -> str:
        """A new merchant at merchant-service with ``webhook_url``; its id."""
        reply = await self.merchants.CreateMerchant(
            merchant_pb2.CreateMerchantRequest(
                request_id=f"m-{time.monotonic_ns()}",
                name="Shop",
                email="shop@example.com",
                country_code="DE",
                default_currency_code="EUR",
                webhook_url=webhook_url,
            )
        )
        return reply.merchant.merchant_id

    def webhooks_down(self) -> None:
        with self.state.lock:
            self.state.faults["merchant-webhooks"] = Fault(error_rate=1.0)

    def webhooks_up(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    async def rotate(
        self, request_id: str = "rot1", *, merchant: str = "m_1", overlap_s: int = 0
    ) -> pb.RotateWebhookSecretResponse:
        return await self.stub.RotateWebhookSecret(
            pb.RotateWebhookSecretRequest(
                request_id=request_id,
                merchant_id=merchant,
                previous_secret_overlap=Duration(seconds=overlap_s),
            )
        )


async def _start_notifier(services: ServicesUnderTest, environ: Mapping[str, str]) -> Notifier:
    """The sandbox, a webhook endpoint, merchant-service, then notification-service (with
    ``environ`` on top of its own) among ``services``."""
    state = services.sandbox()
    receiver = services.stack.enter_context(receiving_webhooks())
    dns = FixedDns(DNS)
    merchants = await services.serve(
        "merchant-service", build_merchant, merchant_pb2_grpc.MerchantServiceStub
    )
    stub = await services.serve(
        NAME,
        functools.partial(build, resolver=dns),
        pb_grpc.NotificationServiceStub,
        environ={**SETTLED_FIRST_ATTEMPT, **environ},
    )
    return Notifier(stub, state, receiver, dns, merchants)


@contextlib.asynccontextmanager
async def _notifier(tmp_path: Path, environ: Mapping[str, str]) -> AsyncIterator[Notifier]:
    """:func:`_start_notifier` on a harness of its own over ``tmp_path``, for the block."""
    async with services_under_test(tmp_path) as services:
        yield await _start_notifier(services, environ)


@pytest.fixture
async def notifier(services: ServicesUnderTest) -> Notifier:
    return await _start_notifier(services, {})


@pytest.fixture
async def production(tmp_path: Path, services: ServicesUnderTest) -> Notifier:
    """notification-service with ``PAYMESH_ENV=production``: named key and TLS files."""
    key = tmp_path / "webhook-secrets.key"
    key.write_text(secrets.token_hex(32))
    layout = pki.PkiLayout(directory=servers.test_pki_dir())
    environ = {
        "PAYMESH_ENV": "production",
        SECRETS_KEY_FILE_VAR: str(key),
        CA_FILE_VAR: str(layout.ca_cert),
        CERT_FILE_VAR: str(layout.cert(NAME)),
        KEY_FILE_VAR: str(layout.key(NAME)),
    }
    return await _start_notifier(services, environ)


def _send(
    request_id: str = "n1",
    *,
    merchant: str = "m_1",
    url: str = "https://merchant.example/hooks",
    payload: str = '{"payment_id": "pay_1", "amount_minor": 1250}',
    event: str = "payment.succeeded",
) -> pb.SendNotificationRequest:
    return pb.SendNotificationRequest(
        request_id=request_id,
        merchant_id=merchant,
        event_type=event,
        payload_json=payload,
        webhook_url=url,
    )


async def eventually(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout_s: float = 10.0
) -> T:
    """Poll ``read`` until ``done`` holds or the deadline passes (then the last value)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await read()
        if done(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.02)


async def _refusal(stub: pb_grpc.NotificationServiceAsyncStub, url: str) -> str:
    """The details of the INVALID_ARGUMENT a send to ``url`` gets."""
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.SendNotification(_send(url=url))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details() or ""


# --- delivery, once per request id ------------------------------------------------------


async def test_notification_is_delivered_to_the_webhook(notifier: Notifier) -> None:
    sent = (await notifier.stub.SendNotification(_send())).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    assert (sent.attempt_count, sent.last_response_code) == (1, 200)
    [received] = notifier.state.webhooks
    assert received["idempotency_key"] == sent.notification_id
    assert received["payload"] == json.loads(_send().payload_json)


async def test_replayed_send_delivers_once(notifier: Notifier) -> None:
    first = await notifier.stub.SendNotification(_send())
    again = await notifier.stub.SendNotification(_send())
    assert again == first
    assert len(notifier.state.webhooks) == 1
    assert notifier.state.requests["merchant-webhooks"] == 1


async def test_request_id_reused_with_another_body_is_invalid_argument(
    notifier: Notifier,
) -> None:
    await notifier.stub.SendNotification(_send())
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.stub.SendNotification(_send(event="payment.refunded"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_notification_id_is_derived_from_the_request_id(notifier: Notifier) -> None:
    sent = (await notifier.stub.SendNotification(_send("evt_42"))).notification
    other = (await notifier.stub.SendNotification(_send("evt_43"))).notification
    assert sent.notification_id.startswith("ntf_")
    assert sent.notification_id != other.notification_id
    assert sent.notification_id == notification_id_for("evt_42")


async def test_notification_without_a_url_goes_to_the_merchants_webhook(
    notifier: Notifier,
) -> None:
    merchant = await notifier.merchant(notifier.receiver.url())
    sent = (await notifier.stub.SendNotification(_send(merchant=merchant, url=""))).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    assert sent.webhook_url == notifier.receiver.url()
    assert notifier.receiver.only().headers["idempotency-key"] == sent.notification_id


async def test_merchant_without_a_webhook_url_is_skipped(notifier: Notifier) -> None:
    merchant = await notifier.merchant()
    sent = (await notifier.stub.SendNotification(_send(merchant=merchant, url=""))).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_SKIPPED, 0)
    assert "no webhook URL" in sent.last_error
    assert not sent.HasField("next_attempt_time")
    assert not notifier.state.webhooks and not notifier.receiver.received


async def test_unknown_merchant_without_a_url_is_skipped(notifier: Notifier) -> None:
    sent = (await notifier.stub.SendNotification(_send(merchant="m_nobody", url=""))).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_SKIPPED
    assert "does not exist" in sent.last_error


async def test_unreachable_merchant_service_leaves_the_notification_pending(
    tmp_path: Path,
) -> None:
    async with _notifier(tmp_path, {"MERCHANT_SERVICE_ADDR": "127.0.0.1:1"}) as notifier:
        sent = (await notifier.stub.SendNotification(_send(url=""))).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_PENDING, 1)
    assert "merchant-service" in sent.last_error
    assert sent.next_attempt_time.ToNanoseconds() > sent.last_attempt_time.ToNanoseconds()


async def test_failed_delivery_is_recorded_with_its_next_attempt(notifier: Notifier) -> None:
    notifier.webhooks_down()
    sent = (await notifier.stub.SendNotification(_send())).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_PENDING
    assert sent.attempt_count == 1
    assert "merchant-webhooks" in sent.last_error
    # The first retry waits between half and all of the initial 10 s.
    wait_s = (sent.next_attempt_time.ToNanoseconds() - sent.last_attempt_time.ToNanoseconds()) / 1e9
    assert 5.0 <= wait_s <= 10.0


async def test_repeated_send_after_a_failure_attempts_nothing(notifier: Notifier) -> None:
    notifier.webhooks_down()
    first = (await notifier.stub.SendNotification(_send())).notification
    requests = notifier.state.requests["merchant-webhooks"]
    notifier.webhooks_up()
    again = (await notifier.stub.SendNotification(_send())).notification
    assert again == first
    assert notifier.state.requests["merchant-webhooks"] == requests


async def test_loop_delivers_a_failed_notification_once_the_partner_is_back(
    tmp_path: Path,
) -> None:
    fast = {
        "NOTIFICATION_SERVICE_RETRY_INITIAL_S": "0.05",
        "NOTIFICATION_SERVICE_RETRY_MAX_S": "0.2",
    }
    fast["NOTIFICATION_SERVICE_DELIVERY_SCAN_S"] = "0.02"
    async with _notifier(tmp_path, fast) as notifier:
        notifier.webhooks_down()
        sent = (await notifier.stub.SendNotification(_send())).notification
        assert sent.delivery_status == pb.DELIVERY_STATUS_PENDING
        notifier.webhooks_up()
        request = pb.GetNotificationRequest(notification_id=sent.notification_id)
        final = await eventually(
            lambda: notifier.stub.GetNotification(request),
            lambda r: r.notification.delivery_status == pb.DELIVERY_STATUS_DELIVERED,
        )
        assert final.notification.attempt_count >= 2
        assert not final.notification.HasField("next_attempt_time")
        assert [w["idempotency_key"] for w in notifier.state.webhooks] == [sent.notification_id]


async def test_list_pages_newest_first_and_filters_by_status(notifier: Notifier) -> None:
    for index in range(5):
        await notifier.stub.SendNotification(_send(f"n{index}"))
    await notifier.stub.SendNotification(_send("skip", url=""))
    await notifier.stub.SendNotification(_send("other", merchant="m_2"))
    seen: list[str] = []
    token = ""
    while True:
        page = await notifier.stub.ListNotifications(
            pb.ListNotificationsRequest(
                merchant_id="m_1",
                delivery_status=pb.DELIVERY_STATUS_DELIVERED,
                page_size=2,
                page_token=token,
            )
        )
        seen.extend(n.request_id for n in page.notifications)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"n{i}" for i in reversed(range(5))]


@pytest.mark.parametrize(
    "request_",
    [
        _send(payload="not json"),
        _send(payload="[1, 2]"),
        _send(payload="[" * 50_000),
        _send(event="Payment Succeeded"),
        _send(url="ftp://merchant.example"),
        _send(url="https://user:pass@merchant.example/hooks"),
        _send(merchant=""),
        _send(request_id=""),
    ],
)
async def test_bad_notification_is_invalid_argument(
    notifier: Notifier, request_: pb.SendNotificationRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.stub.SendNotification(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not notifier.state.webhooks


async def test_unknown_notification_is_not_found(notifier: Notifier) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.stub.GetNotification(pb.GetNotificationRequest(notification_id="ntf_x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- signatures -------------------------------------------------------------------------


async def test_delivered_webhook_verifies_with_the_merchant_secret(notifier: Notifier) -> None:
    secret = (await notifier.rotate()).secret
    sent = (await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    webhook = notifier.receiver.only()
    signing.verify(secret, webhook.headers["paymesh-signature"], webhook.body, time.time())
    event = json.loads(webhook.body)
    assert (event["notification_id"], event["event_type"]) == (
        sent.notification_id,
        "payment.succeeded",
    )
    assert event["payload"] == json.loads(_send().payload_json)
    assert webhook.headers["idempotency-key"] == sent.notification_id


async def test_webhook_played_by_the_sandbox_is_signed_the_same_way(tmp_path: Path) -> None:
    with receiving_webhooks() as partner:
        override = {"MERCHANT_WEBHOOKS_PARTNER_URL": partner.url("/merchant-webhooks")}
        async with _notifier(tmp_path, override) as notifier:
            secret = (await notifier.rotate()).secret
            await notifier.stub.SendNotification(_send(url="https://merchant.example/hooks"))
    webhook = partner.only()
    assert webhook.path == "/merchant-webhooks/deliver"
    signing.verify(secret, webhook.headers["paymesh-signature"], webhook.body, time.time())


async def test_merchant_without_a_secret_still_gets_signed_webhooks(notifier: Notifier) -> None:
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    header = notifier.receiver.only().headers["paymesh-signature"]
    assert header.count("v1=") == 1
    # The secret made on first use exists: rotating it now retires it.
    assert (await notifier.rotate()).HasField("previous_secret_expire_time")


async def test_after_rotation_webhooks_verify_with_the_new_secret_not_the_old(
    notifier: Notifier,
) -> None:
    old = (await notifier.rotate("rot1")).secret
    new = (await notifier.rotate("rot2")).secret
    assert old != new
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    webhook = notifier.receiver.only()
    header = webhook.headers["paymesh-signature"]
    signing.verify(new, header, webhook.body, time.time())
    with pytest.raises(signing.SignatureError):
        signing.verify(old, header, webhook.body, time.time())


async def test_rotation_with_overlap_signs_with_both_secrets(notifier: Notifier) -> None:
    old = (await notifier.rotate("rot1")).secret
    rotated = await notifier.rotate("rot2", overlap_s=3600)
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    webhook = notifier.receiver.only()
    header = webhook.headers["paymesh-signature"]
    assert header.count("v1=") == 2
    for secret in (old, rotated.secret):
        signing.verify(secret, header, webhook.body, time.time())
    expires = rotated.previous_secret_expire_time.ToSeconds()
    assert expires - rotated.webhook_secret.create_time.ToSeconds() == 3600


async def test_replayed_rotation_answers_without_the_secret_and_rotates_once(
    notifier: Notifier,
) -> None:
    first = await notifier.rotate("rot1")
    again = await notifier.rotate("rot1")
    assert first.secret.startswith("whsec_") and again.secret == ""
    assert again.webhook_secret == first.webhook_secret
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    webhook = notifier.receiver.only()
    signing.verify(first.secret, webhook.headers["paymesh-signature"], webhook.body, time.time())


async def test_rotation_request_ids_are_per_merchant(notifier: Notifier) -> None:
    mine = await notifier.rotate("rot1", merchant="m_1")
    theirs = await notifier.rotate("rot1", merchant="m_2")
    assert theirs.secret and theirs.webhook_secret.secret_id != mine.webhook_secret.secret_id
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.rotate("rot1", merchant="m_1", overlap_s=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("overlap_s", [-1, 24 * 3600 + 1])
async def test_overlap_beyond_a_day_or_negative_is_invalid_argument(
    notifier: Notifier, overlap_s: int
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.rotate(overlap_s=overlap_s)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_signature_older_than_five_minutes_is_rejected(notifier: Notifier) -> None:
    secret = (await notifier.rotate()).secret
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    webhook = notifier.receiver.only()
    header = webhook.headers["paymesh-signature"]
    signed_at = int(header.split(",")[0].removeprefix("t="))
    signing.verify(secret, header, webhook.body, signed_at + 300)
    with pytest.raises(signing.SignatureError, match="more than 300 s"):
        signing.verify(secret, header, webhook.body, signed_at + 301)


async def test_tampered_body_is_rejected(notifier: Notifier) -> None:
    secret = (await notifier.rotate()).secret
    await notifier.stub.SendNotification(_send(url=notifier.receiver.url()))
    webhook = notifier.receiver.only()
    tampered = webhook.body.replace(b"1250", b"9250")
    assert tampered != webhook.body
    with pytest.raises(signing.SignatureError, match="no v1 signature matches"):
        signing.verify(secret, webhook.headers["paymesh-signature"], tampered, time.time())


# --- payload cap ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"note": "x" * (64 * 1024)}),
        # Within 64 KiB as UTF-8, three times that once the signed body escapes it.
        json.dumps({"note": "\u00e9" * 30_000}, ensure_ascii=False),
    ],
    ids=["raw", "encoded"],
)
async def test_oversized_payload_is_invalid_argument(notifier: Notifier, payload: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await notifier.stub.SendNotification(_send(url=notifier.receiver.url(), payload=payload))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payload_json" in (caught.value.details() or "")
    assert not notifier.receiver.received


# --- where webhooks may go ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/hooks",
        "https://[::ffff:169.254.169.254]/hooks",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://linklocal.merchant.test/hooks",
    ],
)
async def test_link_local_and_metadata_urls_are_refused_in_development(
    notifier: Notifier, url: str
) -> None:
    details = await _refusal(notifier.stub, url)
    assert "webhook_url" in details and ("link-local" in details or "metadata" in details)
    assert url not in details or len(url) <= 60
    assert not notifier.receiver.received and not notifier.state.webhooks


async def test_plain_http_to_a_name_that_is_not_loopback_is_refused_in_development(
    notifier: Notifier,
) -> None:
    details = await _refusal(notifier.stub, "http://private.merchant.test/hooks")
    assert "plain http only to loopback" in details


async def test_long_refused_url_is_quoted_only_by_its_prefix(notifier: Notifier) -> None:
    url = "https://169.254.169.254/" + "a" * 500 + "?token=secret"
    details = await _refusal(notifier.stub, url)
    assert "token=secret" not in details and len(details) < 200


async def test_delivery_connects_to_the_address_it_checked(notifier: Notifier) -> None:
    # The second lookup would answer the metadata address: there must be none.
    url = notifier.receiver.url(host="rebind.merchant.test")
    sent = (await notifier.stub.SendNotification(_send(url=url))).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    assert notifier.dns.lookups == ["rebind.merchant.test"]
    webhook = notifier.receiver.only()
    assert webhook.headers["host"] == f"rebind.merchant.test:{notifier.receiver.port}"


async def test_unresolvable_host_is_a_failed_attempt_not_a_refusal(notifier: Notifier) -> None:
    sent = (
        await notifier.stub.SendNotification(_send(url="https://nowhere.merchant.test/hooks"))
    ).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_PENDING, 1)
    assert "nowhere.merchant.test" in sent.last_error


async def test_refusal_after_resolution_is_recorded_on_the_notification(
    notifier: Notifier,
) -> None:
    await _refusal(notifier.stub, "https://linklocal.merchant.test/hooks")
    page = await notifier.stub.ListNotifications(pb.ListNotificationsRequest(merchant_id="m_1"))
    [refused] = page.notifications
    assert refused.delivery_status == pb.DELIVERY_STATUS_FAILED
    assert "link-local" in refused.last_error and "169.254" not in refused.last_error


@pytest.mark.parametrize(
    "url",
    [
        "https://10.0.0.7/hooks",
        "https://192.168.1.10/hooks",
        "https://[::ffff:10.0.0.7]/hooks",
        "https://[fd12:3456::1]/hooks",
        "https://100.64.0.1/hooks",
        "https://private.merchant.test/hooks",
        "https://mixed.merchant.test/hooks",
        "https://127.0.0.1/hooks",
        "https://localhost/hooks",
        "https://169.254.169.254/latest/meta-data/",
    ],
)
async def test_private_and_loopback_addresses_are_refused_in_production(
    production: Notifier, url: str
) -> None:
    details = await _refusal(production.stub, url)
    assert "production" in details or "link-local" in details or "metadata" in details
    assert not production.receiver.received and not production.state.webhooks


async def test_https_is_required_in_production(production: Notifier) -> None:
    details = await _refusal(production.stub, production.receiver.url())
    assert "must be https in production" in details
    assert not production.receiver.received


async def test_sandbox_does_not_play_merchants_in_production(production: Notifier) -> None:
    sent = (
        await production.stub.SendNotification(_send(url="https://merchant.example/hooks"))
    ).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_PENDING
    assert not production.state.webhooks
