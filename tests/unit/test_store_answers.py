"""What a store's write returns is the row as stored: the same as reading it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from paymesh.channel_adapter.v1 import channel_adapter_pb2 as ca
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2 as nt
from services.channel_adapter.store import ChannelOutcome, ChargeStore, Conversion
from services.notification.store import Attempt, NotificationStore
from tests.unit.fakes import FakeClock


def _charge_request(request_id: str = "r1") -> ca.ChargeRequest:
    return ca.ChargeRequest(
        request_id=request_id,
        payment_id="pay_1",
        merchant_id="m_1",
        amount=common_pb2.Money(amount_minor=1250, currency_code="JPY"),
        settlement_currency_code="USD",
        payment_method_token="tok_visa",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.25)


@pytest.fixture
def charges(tmp_path: Path, clock: FakeClock) -> Iterator[ChargeStore]:
    store = ChargeStore(tmp_path / "charges.db", clock=clock)
    yield store
    store.close()


@pytest.mark.parametrize(
    "outcome",
    [
        ChannelOutcome(ca.CHARGE_STATUS_SUCCEEDED, channel_reference="chn_1"),
        ChannelOutcome(ca.CHARGE_STATUS_DECLINED, decline_reason="card_declined"),
        ChannelOutcome(ca.CHARGE_STATUS_FAILED, failure_reason="channel refused it"),
        ChannelOutcome(
            ca.CHARGE_STATUS_PARTIALLY_REFUNDED, channel_reference="chn_2", refunded_minor=50
        ),
    ],
)
def test_a_started_then_finished_charge_is_the_charge_as_stored(
    charges: ChargeStore, clock: FakeClock, outcome: ChannelOutcome
) -> None:
    pending = charges.start_charge(_charge_request(), Conversion(1099, "USD", "0.0088"))
    assert pending.charge == charges.get(pending.charge.charge_id)
    assert pending.payment_method_token == "tok_visa"
    assert charges.pending_charge("r1").charge == pending.charge
    clock.advance(1.5)
    finished = charges.finish_charge(pending.charge.charge_id, outcome)
    assert finished == charges.get(pending.charge.charge_id)
    assert finished.status == outcome.status
    assert finished.update_time.ToNanoseconds() > finished.create_time.ToNanoseconds()
    replayed = charges.peek("Charge", "r1", _charge_request())
    assert replayed.state == "done" and replayed.response is not None
    assert ca.ChargeResponse.FromString(replayed.response).charge == finished


def test_finishing_a_charge_twice_keeps_the_first_answer(
    charges: ChargeStore, clock: FakeClock
) -> None:
    pending = charges.start_charge(_charge_request(), Conversion(1250, "JPY", ""))
    first = charges.finish_charge(
        pending.charge.charge_id, ChannelOutcome(ca.CHARGE_STATUS_SUCCEEDED, "chn_1")
    )
    clock.advance(1.5)
    again = charges.finish_charge(
        pending.charge.charge_id, ChannelOutcome(ca.CHARGE_STATUS_DECLINED, decline_reason="x")
    )
    assert again == first == charges.get(pending.charge.charge_id)


@pytest.fixture
def notifications(tmp_path: Path, clock: FakeClock) -> Iterator[NotificationStore]:
    store = NotificationStore(tmp_path / "notifications.db", clock=clock)
    yield store
    store.close()


def _send(
    request_id: str = "r1", url: str = "https://example.com/hook"
) -> nt.SendNotificationRequest:
    return nt.SendNotificationRequest(
        request_id=request_id,
        merchant_id="m_1",
        event_type="payment.succeeded",
        payload_json='{"payment_id": "pay_1"}',
        webhook_url=url,
    )


@pytest.mark.parametrize("url", ["https://example.com/hook", ""])
def test_a_recorded_notification_is_the_notification_as_stored(
    notifications: NotificationStore, url: str
) -> None:
    [outcome] = notifications.record_each([_send(url=url)])
    made = outcome.unwrap().notification
    assert made == notifications.get(made.notification_id)
    [again] = notifications.record_each([_send(url=url)])
    assert again.duplicate and again.unwrap().notification == made


@pytest.mark.parametrize(
    "attempts",
    [
        [Attempt(nt.DELIVERY_STATUS_DELIVERED, 200, "")],
        [Attempt(nt.DELIVERY_STATUS_PENDING, 503, "HTTP 503", next_attempt_time=1_700_000_060.5)],
        [
            Attempt(nt.DELIVERY_STATUS_PENDING, 0, "timed out", next_attempt_time=1_700_000_030),
            Attempt(nt.DELIVERY_STATUS_DEAD_LETTERED, 500, "HTTP 500"),
        ],
        [
            Attempt(nt.DELIVERY_STATUS_PENDING, 0, "no URL", counted=False, next_attempt_time=5.0),
            Attempt(
                nt.DELIVERY_STATUS_DELIVERED, 204, "", webhook_url="https://merchant.example/h"
            ),
            Attempt(nt.DELIVERY_STATUS_PENDING, 500, "late", next_attempt_time=9.0),
        ],
    ],
)
def test_each_attempt_answers_the_notification_as_stored(
    notifications: NotificationStore, clock: FakeClock, attempts: list[Attempt]
) -> None:
    [outcome] = notifications.record_each([_send(url="")])
    notification_id = outcome.unwrap().notification.notification_id
    for attempt in attempts:
        clock.advance(2.5)
        answered = notifications.record_attempt(notification_id, attempt)
        assert answered == notifications.get(notification_id)


def test_a_redelivery_answers_the_notification_as_stored(
    notifications: NotificationStore, clock: FakeClock
) -> None:
    [outcome] = notifications.record_each([_send()])
    notification_id = outcome.unwrap().notification.notification_id
    clock.advance(1)
    notifications.record_attempt(
        notification_id, Attempt(nt.DELIVERY_STATUS_DEAD_LETTERED, 500, "HTTP 500")
    )
    clock.advance(1)
    request = nt.RedeliverNotificationRequest(request_id="rd1", notification_id=notification_id)
    redelivered = notifications.redeliver(request)
    assert redelivered == notifications.get(notification_id)
    assert redelivered.delivery_status == nt.DELIVERY_STATUS_PENDING
    assert not redelivered.HasField("dead_letter_time")
