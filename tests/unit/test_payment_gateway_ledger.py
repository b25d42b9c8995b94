"""payment-gateway's pure money rules: postings balance, refund shares add up, statuses follow."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.payment_gateway import ledger


def _signed(postings: list[accounting_pb2.Posting], account: str) -> int:
    total = 0
    for posting in postings:
        if posting.account_id == account:
            sign = 1 if posting.direction == accounting_pb2.ENTRY_DIRECTION_CREDIT else -1
            total += sign * posting.amount.amount_minor
    return total


def test_capture_debits_psp_clearing_and_credits_the_merchant() -> None:
    money = common_pb2.Money(amount_minor=1250, currency_code="EUR")
    postings = ledger.capture_postings("m_1", money)
    assert _signed(postings, "platform/psp_clearing") == -1250
    assert _signed(postings, "merchants/m_1/available") == 1250


def test_refund_postings_reverse_the_capture() -> None:
    money = common_pb2.Money(amount_minor=300, currency_code="EUR")
    both = ledger.capture_postings("m_1", money) + ledger.refund_postings("m_1", money)
    assert _signed(both, "platform/psp_clearing") == 0
    assert _signed(both, "merchants/m_1/available") == 0


def test_transaction_ids_are_deterministic() -> None:
    assert ledger.capture_transaction_id("pay_1") == "txn:pay_1:capture"
    assert ledger.refund_transaction_id("ref_1") == "txn:ref_1"


def test_partial_refund_share_is_proportional_and_rounded_half_even() -> None:
    # 50 of 100 captured, settled as 125: exactly half is 62.5, half-even rounds to 62.
    share = ledger.refund_settlement_share(
        amount=50, captured=100, settlement=125, refundable=100, settlement_refundable=125
    )
    assert share == 62


def test_refund_of_everything_left_takes_the_whole_settlement_left() -> None:
    share = ledger.refund_settlement_share(
        amount=50, captured=100, settlement=125, refundable=50, settlement_refundable=63
    )
    assert share == 63


@pytest.mark.parametrize("amount", [0, -1, 101])
def test_refund_share_refuses_amounts_outside_what_is_refundable(amount: int) -> None:
    with pytest.raises(ValueError):
        ledger.refund_settlement_share(
            amount=amount, captured=100, settlement=100, refundable=100, settlement_refundable=100
        )


@given(
    captured=st.integers(min_value=1, max_value=10**12),
    settlement=st.integers(min_value=1, max_value=10**12),
    cuts=st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=8),
)
def test_refund_shares_always_add_up_to_the_settlement_amount(
    captured: int, settlement: int, cuts: list[float]
) -> None:
    refundable, settlement_left, shares = captured, settlement, []
    for cut in cuts:
        amount = max(1, int(refundable * cut))
        share = ledger.refund_settlement_share(
            amount=amount,
            captured=captured,
            settlement=settlement,
            refundable=refundable,
            settlement_refundable=settlement_left,
        )
        assert 0 <= share <= settlement_left
        shares.append(share)
        refundable -= amount
        settlement_left -= share
        if refundable == 0:
            break
    if refundable:
        shares.append(
            ledger.refund_settlement_share(
                amount=refundable,
                captured=captured,
                settlement=settlement,
                refundable=refundable,
                settlement_refundable=settlement_left,
            )
        )
    assert sum(shares) == settlement


@pytest.mark.parametrize(
    ("refunded", "status"),
    [
        (0, pg.PAYMENT_STATUS_SUCCEEDED),
        (1, pg.PAYMENT_STATUS_PARTIALLY_REFUNDED),
        (99, pg.PAYMENT_STATUS_PARTIALLY_REFUNDED),
        (100, pg.PAYMENT_STATUS_REFUNDED),
    ],
)
def test_status_after_refunds(refunded: int, status: int) -> None:
    assert ledger.status_after_refunds(captured=100, refunded=refunded) == status


def test_order_status_mirrors_the_payment() -> None:
    assert ledger.order_status_for(pg.PAYMENT_STATUS_SUCCEEDED) == order_pb2.ORDER_STATUS_PAID
    assert ledger.order_status_for(pg.PAYMENT_STATUS_REFUNDED) == order_pb2.ORDER_STATUS_REFUNDED
    assert ledger.order_status_for(pg.PAYMENT_STATUS_VOIDED) == order_pb2.ORDER_STATUS_CANCELLED
