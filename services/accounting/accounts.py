"""The ledger's accounts: what each holds, and the one place their ids are spelled.

A balance is credits minus debits. Money a merchant earns moves left to right, one posting
per step, so at every instant each account says exactly where the money is:

``platform/psp_clearing``
    Owed to the platform by the payment channel for captured payments (debited at capture,
    credited back by refunds; negative in normal operation).
``merchants/{id}/available``
    Earned by the merchant, free to settle or withdraw (credited at capture, debited by
    refunds, settlements and direct withdrawals).
``merchants/{id}/settling``
    Taken from ``available`` by a settlement that has not handed it to the bank yet.
``merchants/{id}/payout_in_transit``
    Handed to the bank partner by a withdrawal, not yet confirmed paid: still the merchant's
    money, not yet paid out. Credited when the withdrawal starts (from ``available``, or from
    ``settling`` for a settlement's withdrawal), debited when the bank confirms (to
    ``platform/bank_payouts``) or refuses (back to the account it came from).
``platform/bank_payouts``
    Paid out to merchants' bank accounts, as the bank confirmed; only a confirmed transfer
    is ever posted here.

Transaction ids are derived from the business id, so a retry reuses them: a settlement posts
``txn:{stl}`` (available -> settling) and ``txn:{stl}:reversal``; a withdrawal posts
``txn:{wd}`` (source -> payout_in_transit), then ``txn:{wd}:paid`` (payout_in_transit ->
bank_payouts) or ``txn:{wd}:reversal`` (payout_in_transit -> source).
"""

from __future__ import annotations

#: What the payment channel owes the platform for captured payments.
PSP_CLEARING = "platform/psp_clearing"
#: Money the bank confirmed it paid out to merchants.
BANK_PAYOUTS = "platform/bank_payouts"


def available(merchant_id: str) -> str:
    """The merchant's account of earned money, free to settle or withdraw."""
    return f"merchants/{merchant_id}/available"


def settling(merchant_id: str) -> str:
    """The merchant's account of money in a settlement, not yet handed to the bank."""
    return f"merchants/{merchant_id}/settling"


def payout_in_transit(merchant_id: str) -> str:
    """The merchant's account of money handed to the bank, not yet confirmed paid out."""
    return f"merchants/{merchant_id}/payout_in_transit"
