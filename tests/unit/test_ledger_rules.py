"""The ledger's and the analytics' pure rules: account ids, balance checks, success rates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from services.accounting import ledger
from services.analytics.store import success_rate_bps
from services.mesh.errors import InvalidArgument


def _posting(
    account: str,
    direction: accounting_pb2.EntryDirection.ValueType,
    amount: int,
    currency: str = "EUR",
) -> accounting_pb2.Posting:
    return accounting_pb2.Posting(
        account_id=account,
        direction=direction,
        amount=common_pb2.Money(amount_minor=amount, currency_code=currency),
    )


@pytest.mark.parametrize(
    "account", ["merchants/m_1/available", "merchants/M-1.x:y/settling", "platform/psp_clearing"]
)
def test_well_formed_account_ids_are_accepted(account: str) -> None:
    assert ledger.require_account_id("a", account) == account


@pytest.mark.parametrize(
    "account", ["merchants/m_1", "platform", "platform/x/y", "merchants/-m/available", "x/y"]
)
def test_malformed_account_ids_are_rejected(account: str) -> None:
    with pytest.raises(InvalidArgument):
        ledger.require_account_id("a", account)


def test_transaction_ids_may_embed_a_full_length_business_id() -> None:
    transaction_id = f"txn:{'p' * 64}:capture"
    assert ledger.require_transaction_id("t", transaction_id) == transaction_id


def test_merchant_range_holds_its_accounts_and_no_other_merchants() -> None:
    low, high = ledger.merchant_account_range("m_1")
    assert low <= "merchants/m_1/available" < high
    assert low <= "merchants/m_1/zzz" < high
    for other in ("merchants/m_10/available", "merchants/m_1", "merchants/m_0/available"):
        assert not low <= other < high


@given(
    amounts=st.lists(st.integers(min_value=10, max_value=10**10), min_size=1, max_size=10),
    skew=st.integers(min_value=-5, max_value=5),
)
def test_postings_pass_exactly_when_debits_equal_credits(amounts: list[int], skew: int) -> None:
    postings = [_posting("platform/psp_clearing", ledger.DEBIT, n) for n in amounts]
    postings.append(_posting("merchants/m_1/available", ledger.CREDIT, sum(amounts) + skew))
    if skew == 0:
        ledger.check_postings(postings)
    else:
        with pytest.raises(InvalidArgument) as caught:
            ledger.check_postings(postings)
        assert caught.value.reason == "LEDGER_UNBALANCED"


def test_content_fingerprint_ignores_request_id_and_guards() -> None:
    request = accounting_pb2.PostTransactionRequest(
        request_id="r1",
        transaction_id="txn:1",
        postings=[
            _posting("platform/a", ledger.DEBIT, 5),
            _posting("platform/b", ledger.CREDIT, 5),
        ],
    )
    retry = accounting_pb2.PostTransactionRequest()
    retry.CopyFrom(request)
    retry.request_id = "r2"
    retry.non_negative_account_ids.append("platform/a")
    assert ledger.content_fingerprint(retry) == ledger.content_fingerprint(request)
    retry.postings[0].amount.amount_minor = 6
    assert ledger.content_fingerprint(retry) != ledger.content_fingerprint(request)


@pytest.mark.parametrize(
    ("succeeded", "declined", "failed", "bps"),
    [(0, 0, 0, 0), (1, 0, 0, 10_000), (2, 1, 0, 6_666), (1, 1, 1, 3_333), (9_999, 1, 0, 9_999)],
)
def test_success_rate_is_basis_points_rounded_down(
    succeeded: int, declined: int, failed: int, bps: int
) -> None:
    assert success_rate_bps(succeeded, declined, failed) == bps
