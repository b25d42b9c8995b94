"""What a store's write returns is the row as stored: the same as reading it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from paymesh.channel_adapter.v1 import channel_adapter_pb2 as ca
from paymesh.common.v1 import common_pb2
from services.channel_adapter.store import ChannelOutcome, ChargeStore, Conversion
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
