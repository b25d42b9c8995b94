"""notification-service through real gRPC on loopback against the sandbox's merchant webhooks.

One request id is one notification and at most one webhook delivery, ever; a failed
delivery is recorded on the notification, and sending again re-attempts only until delivered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services.notification.__main__ import build
from services.partners.sandbox import Fault, SandboxState
from tests.servers import running_sandbox, running_service


@dataclass
class Notifier:
    stub: pb_grpc.NotificationServiceStub
    state: SandboxState

    def webhooks_down(self) -> None:
        with self.state.lock:
            self.state.faults["merchant-webhooks"] = Fault(error_rate=1.0)

    def webhooks_up(self) -> None:
        with self.state.lock:
            self.state.faults.clear()


@pytest.fixture
async def notifier(tmp_path: Path) -> AsyncIterator[Notifier]:
    with running_sandbox() as (sandbox, state):
        env = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": sandbox}
        async with (
            running_service("notification-service", build, environ=env) as address,
            aio.insecure_channel(address) as channel,
        ):
            yield Notifier(pb_grpc.NotificationServiceStub(channel), state)


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


async def test_empty_webhook_url_is_recorded_as_skipped(notifier: Notifier) -> None:
    sent = (await notifier.stub.SendNotification(_send(url=""))).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_SKIPPED, 0)
    assert not notifier.state.webhooks


async def test_failed_delivery_is_recorded_not_raised(notifier: Notifier) -> None:
    notifier.webhooks_down()
    sent = (await notifier.stub.SendNotification(_send())).notification
    assert sent.delivery_status == pb.DELIVERY_STATUS_PENDING
    assert sent.attempt_count == 1
    assert "merchant-webhooks" in sent.last_error


async def test_resend_after_a_failure_delivers_once(notifier: Notifier) -> None:
    notifier.webhooks_down()
    await notifier.stub.SendNotification(_send())
    notifier.webhooks_up()
    sent = (await notifier.stub.SendNotification(_send())).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_DELIVERED, 2)
    await notifier.stub.SendNotification(_send())
    assert len(notifier.state.webhooks) == 1


async def test_delivery_is_given_up_after_the_last_attempt(notifier: Notifier) -> None:
    notifier.webhooks_down()
    for _ in range(5):
        sent = (await notifier.stub.SendNotification(_send())).notification
    assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_FAILED, 5)
    got = await notifier.stub.GetNotification(
        pb.GetNotificationRequest(notification_id=sent.notification_id)
    )
    assert got.notification == sent


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
        _send(event="Payment Succeeded"),
        _send(url="ftp://merchant.example"),
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
