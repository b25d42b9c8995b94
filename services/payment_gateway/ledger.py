"""Money rules of payments and refunds: ledger postings, refund shares, resulting statuses.

Pure functions over integer minor units (no I/O), so the arithmetic that keeps the ledger
balanced and refunds bounded is unit-tested on its own.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg

#: The platform's side of every captured payment (money the PSP owes the platform).
PSP_CLEARING = "platform/psp_clearing"


def merchant_available(merchant_id: str) -> str:
    """The ledger account a merchant's captured payments are credited to."""
    return f"merchants/{merchant_id}/available"


def capture_transaction_id(payment_id: str) -> str:
    """The deterministic ledger transaction id of a payment's capture."""
    return f"txn:{payment_id}:capture"


def refund_transaction_id(refund_id: str) -> str:
    """The deterministic ledger transaction id of a refund."""
    return f"txn:{refund_id}"


def _posting(
    account: str, direction: accounting_pb2.EntryDirection.ValueType, amount: common_pb2.Money
) -> accounting_pb2.Posting:
    return accounting_pb2.Posting(account_id=account, direction=direction, amount=amount)


def capture_postings(merchant_id: str, settled: common_pb2.Money) -> list[accounting_pb2.Posting]:
    """DEBIT the PSP clearing account, CREDIT the merchant's available balance."""
    return [
        _posting(PSP_CLEARING, accounting_pb2.ENTRY_DIRECTION_DEBIT, settled),
        _posting(merchant_available(merchant_id), accounting_pb2.ENTRY_DIRECTION_CREDIT, settled),
    ]


def refund_postings(merchant_id: str, settled: common_pb2.Money) -> list[accounting_pb2.Posting]:
    """The reverse of :func:`capture_postings` for the refunded settlement amount."""
    return [
        _posting(merchant_available(merchant_id), accounting_pb2.ENTRY_DIRECTION_DEBIT, settled),
        _posting(PSP_CLEARING, accounting_pb2.ENTRY_DIRECTION_CREDIT, settled),
    ]


def refund_settlement_share(
    *, amount: int, captured: int, settlement: int, refundable: int, settlement_refundable: int
) -> int:
    """The settlement-currency part of refunding ``amount`` (payment currency) of a payment.

    Proportional to the captured amount, rounded half-even; the refund of everything still
    refundable takes exactly the settlement amount still refundable, so the refunds of a
    payment add up to its settlement amount with no rounding drift.

    Raises:
        ValueError: ``amount`` is not positive or exceeds ``refundable``.
    """
    if amount <= 0 or amount > refundable or captured <= 0:
        raise ValueError(f"cannot refund {amount} of {refundable} refundable ({captured} captured)")
    if amount == refundable:
        return settlement_refundable
    share = (Decimal(amount) * Decimal(settlement) / Decimal(captured)).quantize(
        Decimal(1), rounding=ROUND_HALF_EVEN
    )
    return min(int(share), settlement_refundable)


def status_after_refunds(*, captured: int, refunded: int) -> pg.PaymentStatus.ValueType:
    """REFUNDED once everything captured is refunded, PARTIALLY_REFUNDED before that."""
    if refunded >= captured:
        return pg.PAYMENT_STATUS_REFUNDED
    return pg.PAYMENT_STATUS_PARTIALLY_REFUNDED if refunded > 0 else pg.PAYMENT_STATUS_SUCCEEDED


def order_status_for(status: pg.PaymentStatus.ValueType) -> order_pb2.OrderStatus.ValueType:
    """The order status that mirrors a terminal payment status."""
    return {
        pg.PAYMENT_STATUS_SUCCEEDED: order_pb2.ORDER_STATUS_PAID,
        pg.PAYMENT_STATUS_PARTIALLY_REFUNDED: order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED,
        pg.PAYMENT_STATUS_REFUNDED: order_pb2.ORDER_STATUS_REFUNDED,
    }.get(status, order_pb2.ORDER_STATUS_CANCELLED)
