"""The ledger's rules as pure functions: account ids, balanced postings, what "same body" means.

The servicer checks a transaction with these before the store writes it, so each rule can be
tested without a server. A balance is credits minus debits, per account and currency.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from interceptors.errors import Reason
from paymesh.accounting.v1 import accounting_pb2
from services.mesh import validation as v
from services.mesh.errors import FieldViolation, InvalidArgument

DEBIT = accounting_pb2.ENTRY_DIRECTION_DEBIT
CREDIT = accounting_pb2.ENTRY_DIRECTION_CREDIT
#: Postings of one transaction; with MAX_AMOUNT_MINOR per posting no sum nears int64.
MAX_POSTINGS = 100
#: Transaction ids embed business ids (``txn:{payment_id}:capture``), so they may be longer
#: than the 64 characters of a plain id.
MAX_TRANSACTION_ID_LENGTH = 128
_LEDGER = r"[a-z][a-z0-9_]{0,31}"
_MERCHANT = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
_ACCOUNT_ID = re.compile(rf"^(?:merchants/{_MERCHANT}/{_LEDGER}|platform/{_LEDGER})$")
_TRANSACTION_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{MAX_TRANSACTION_ID_LENGTH - 1}}}$")


def require_account_id(field: str, value: str) -> str:
    """An account id: ``merchants/{merchant_id}/{ledger}`` or ``platform/{ledger}``."""
    if not value:
        raise v.invalid(field, "is required")
    if not _ACCOUNT_ID.fullmatch(value):
        raise v.invalid(
            field,
            "must be merchants/{merchant_id}/{ledger} or platform/{ledger}, where the ledger is"
            f" 1-32 lower-case letters, digits or _ (got {v.quote(value)})",
        )
    return value


def require_transaction_id(field: str, value: str) -> str:
    """A caller-chosen transaction id: letters, digits and ``_.:-``, at most 128 characters."""
    if not value:
        raise v.invalid(field, "is required")
    if not _TRANSACTION_ID.fullmatch(value):
        raise v.invalid(
            field,
            f"must be 1-{MAX_TRANSACTION_ID_LENGTH} letters, digits or _.:- (got {v.quote(value)})",
        )
    return value


def merchant_account_range(merchant_id: str) -> tuple[str, str]:
    """The half-open range ``[low, high)`` of account ids a merchant owns.

    ``/`` sorts just below ``0``, so ``merchants/m_1/`` up to ``merchants/m_10`` holds every
    account of ``m_1`` and none of ``m_10``; unlike LIKE, ``_`` in an id is no wildcard.
    """
    prefix = f"merchants/{merchant_id}/"
    return prefix, prefix[:-1] + chr(ord("/") + 1)


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    """Debits and credits of one transaction in one currency."""

    currency_code: str
    debit_minor: int
    credit_minor: int


def currency_totals(postings: Iterable[accounting_pb2.Posting]) -> list[CurrencyTotals]:
    """Debit and credit sums per currency, ordered by currency code."""
    sums: dict[str, list[int]] = {}
    for posting in postings:
        totals = sums.setdefault(posting.amount.currency_code, [0, 0])
        totals[0 if posting.direction == DEBIT else 1] += posting.amount.amount_minor
    return [CurrencyTotals(code, d, c) for code, (d, c) in sorted(sums.items())]


def check_postings(postings: Sequence[accounting_pb2.Posting]) -> None:
    """Check every posting, then that debits equal credits in each currency.

    Raises:
        InvalidArgument: a malformed posting (VALIDATION_FAILED, AMOUNT_INVALID,
            CURRENCY_UNSUPPORTED), or LEDGER_UNBALANCED with one violation per currency
            that does not balance.
    """
    if len(postings) < 2:
        raise v.invalid(
            "postings",
            f"a transaction needs at least two postings, got {len(postings)}",
            reason=Reason.LEDGER_UNBALANCED,
        )
    if len(postings) > MAX_POSTINGS:
        raise v.invalid("postings", f"at most {MAX_POSTINGS} postings, got {len(postings)}")
    for index, posting in enumerate(postings):
        field = f"postings[{index}]"
        require_account_id(f"{field}.account_id", posting.account_id)
        if posting.direction not in (DEBIT, CREDIT):
            raise v.invalid(f"{field}.direction", "must be ENTRY_DIRECTION_DEBIT or _CREDIT")
        v.require_amount(f"{field}.amount", posting.amount)
    unbalanced = [t for t in currency_totals(postings) if t.debit_minor != t.credit_minor]
    if unbalanced:
        violations = [
            FieldViolation(
                "postings",
                f"{t.currency_code}: debits {t.debit_minor} != credits {t.credit_minor}",
            )
            for t in unbalanced
        ]
        raise InvalidArgument(
            "transaction does not balance: " + "; ".join(f.description for f in violations),
            reason=Reason.LEDGER_UNBALANCED,
            field_violations=violations,
        )


def content_fingerprint(request: accounting_pb2.PostTransactionRequest) -> str:
    """A digest of what a transaction records: "the same transaction" under its id.

    The request id and the non-negative guard are left out: a retry under a new request id,
    or with the guard dropped, still names the same ledger movement.
    """
    body = accounting_pb2.PostTransactionRequest()
    body.CopyFrom(request)
    body.ClearField("request_id")
    body.ClearField("non_negative_account_ids")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()
