"""accounting-service through real gRPC on loopback: balanced, idempotent, never overdrawn."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Sequence
from typing import TypeAlias

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from services.accounting.__main__ import build
from tests.servers import (
    ServicesUnderTest,
    error_reason,
    granted_stub,
    rich_status_of,
    running_service,
)

NAME = "accounting-service"
DEBIT = accounting_pb2.ENTRY_DIRECTION_DEBIT
CREDIT = accounting_pb2.ENTRY_DIRECTION_CREDIT
CLEARING = "platform/psp_clearing"
PAYOUTS = "platform/bank_payouts"
AVAILABLE = "merchants/m_1/available"
SETTLING = "merchants/m_1/settling"

Ledger: TypeAlias = "accounting_pb2_grpc.AccountingServiceAsyncStub"  # a typing-only class


@pytest.fixture
async def ledger(services: ServicesUnderTest) -> Ledger:
    return await services.serve(NAME, build, accounting_pb2_grpc.AccountingServiceStub)


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


def _transfer(
    request_id: str,
    transaction_id: str,
    *,
    debit: str = CLEARING,
    credit: str = AVAILABLE,
    amount: int = 1000,
    currency: str = "EUR",
    kind: accounting_pb2.TransactionKind.ValueType = accounting_pb2.TRANSACTION_KIND_PAYMENT,
    non_negative: Sequence[str] = (),
) -> accounting_pb2.PostTransactionRequest:
    return accounting_pb2.PostTransactionRequest(
        request_id=request_id,
        transaction_id=transaction_id,
        kind=kind,
        reference_id=transaction_id.removeprefix("txn:"),
        postings=[
            _posting(debit, DEBIT, amount, currency),
            _posting(credit, CREDIT, amount, currency),
        ],
        non_negative_account_ids=non_negative,
    )


async def _balance(ledger: Ledger, account: str, currency: str = "EUR") -> int:
    response = await ledger.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=account, currency_code=currency)
    )
    return response.balance.balance.amount_minor


async def _rejected(call: Awaitable[object]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


def _violations(error: aio.AioRpcError) -> list[str]:
    fields: list[str] = []
    for detail in rich_status_of(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    return fields


async def test_posted_transaction_moves_both_balances(ledger: Ledger) -> None:
    posted = await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture", amount=1250))
    assert [e.account_id for e in posted.transaction.entries] == [CLEARING, AVAILABLE]
    assert await _balance(ledger, AVAILABLE) == 1250
    assert await _balance(ledger, CLEARING) == -1250


async def test_get_transaction_returns_what_was_posted(ledger: Ledger) -> None:
    posted = await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    fetched = await ledger.GetTransaction(
        accounting_pb2.GetTransactionRequest(transaction_id="txn:pay_1:capture")
    )
    assert fetched.transaction == posted.transaction
    assert fetched.transaction.reference_id == "pay_1:capture"


async def test_replayed_request_id_posts_once(ledger: Ledger) -> None:
    first = await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    again = await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    assert again.transaction == first.transaction
    assert await _balance(ledger, AVAILABLE) == 1000


async def test_concurrent_duplicates_post_once(ledger: Ledger) -> None:
    request = _transfer("r1", "txn:pay_1:capture")
    results = await asyncio.gather(*(ledger.PostTransaction(request) for _ in range(20)))
    assert len({r.transaction.SerializeToString() for r in results}) == 1
    assert await _balance(ledger, AVAILABLE) == 1000


async def test_same_transaction_id_under_new_request_id_returns_the_stored_one(
    ledger: Ledger,
) -> None:
    first = await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    again = await ledger.PostTransaction(_transfer("r2", "txn:pay_1:capture"))
    assert again.transaction == first.transaction
    assert await _balance(ledger, AVAILABLE) == 1000


async def test_same_transaction_id_with_other_postings_is_already_exists(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    error = await _rejected(ledger.PostTransaction(_transfer("r2", "txn:pay_1:capture", amount=5)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await _balance(ledger, AVAILABLE) == 1000


async def test_request_id_reused_for_another_transaction_is_invalid_argument(
    ledger: Ledger,
) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture"))
    error = await _rejected(ledger.PostTransaction(_transfer("r1", "txn:pay_2:capture")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "IDEMPOTENCY_KEY_REUSED"


async def test_unbalanced_transaction_is_rejected_with_a_violation_per_currency(
    ledger: Ledger,
) -> None:
    request = _transfer("r1", "txn:bad")
    request.postings.extend(
        [_posting(CLEARING, DEBIT, 500, "USD"), _posting(AVAILABLE, CREDIT, 499, "USD")]
    )
    request.postings[1].amount.amount_minor = 999
    error = await _rejected(ledger.PostTransaction(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "LEDGER_UNBALANCED"
    assert _violations(error) == [
        "postings: EUR: debits 1000 != credits 999",
        "postings: USD: debits 500 != credits 499",
    ]
    missing = await _rejected(
        ledger.GetTransaction(accounting_pb2.GetTransactionRequest(transaction_id="txn:bad"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_totals_balanced_only_across_currencies_are_unbalanced(ledger: Ledger) -> None:
    request = _transfer("r1", "txn:fx")
    request.postings[1].amount.currency_code = "USD"
    error = await _rejected(ledger.PostTransaction(request))
    assert error_reason(error) == "LEDGER_UNBALANCED"


async def test_single_posting_is_unbalanced(ledger: Ledger) -> None:
    request = _transfer("r1", "txn:one")
    del request.postings[1]
    error = await _rejected(ledger.PostTransaction(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "LEDGER_UNBALANCED"


async def test_multi_currency_transaction_balanced_per_currency_is_posted(ledger: Ledger) -> None:
    request = _transfer("r1", "txn:multi")
    request.postings.extend(
        [
            _posting(CLEARING, DEBIT, 300, "JPY"),
            _posting(AVAILABLE, CREDIT, 100, "JPY"),
            _posting(SETTLING, CREDIT, 200, "JPY"),
        ]
    )
    await ledger.PostTransaction(request)
    assert await _balance(ledger, SETTLING, "JPY") == 200
    assert await _balance(ledger, CLEARING, "JPY") == -300


@pytest.mark.parametrize(
    "account",
    [
        "merchants/m_1",
        "merchants//available",
        "merchants/m_1/Available",
        "merchants/m 1/available",
        "platform/",
        "platform/a/b",
        "customers/c_1/available",
        "",
    ],
)
async def test_malformed_account_id_is_invalid_argument(ledger: Ledger, account: str) -> None:
    error = await _rejected(ledger.PostTransaction(_transfer("r1", "txn:1", credit=account)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(error)[0].startswith("postings[1].account_id:")


@pytest.mark.parametrize(
    ("amount", "currency"), [(0, "EUR"), (-5, "EUR"), (10**13, "EUR"), (5, "XXX")]
)
async def test_bad_posting_amount_is_invalid_argument(
    ledger: Ledger, amount: int, currency: str
) -> None:
    error = await _rejected(
        ledger.PostTransaction(_transfer("r1", "txn:1", amount=amount, currency=currency))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_missing_direction_or_kind_is_invalid_argument(ledger: Ledger) -> None:
    no_direction = _transfer("r1", "txn:1")
    no_direction.postings[0].direction = accounting_pb2.ENTRY_DIRECTION_UNSPECIFIED
    no_kind = _transfer("r1", "txn:1", kind=accounting_pb2.TRANSACTION_KIND_UNSPECIFIED)
    for request in (no_direction, no_kind):
        error = await _rejected(ledger.PostTransaction(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_withdrawal_beyond_balance_is_insufficient_and_writes_nothing(
    ledger: Ledger,
) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture", amount=1000))
    overdraw = _transfer(
        "r2", "txn:wd_1", debit=AVAILABLE, credit=PAYOUTS, amount=1001, non_negative=[AVAILABLE]
    )
    error = await _rejected(ledger.PostTransaction(overdraw))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "INSUFFICIENT_BALANCE"
    assert await _balance(ledger, AVAILABLE) == 1000
    assert await _balance(ledger, PAYOUTS) == 0
    missing = await _rejected(
        ledger.GetTransaction(accounting_pb2.GetTransactionRequest(transaction_id="txn:wd_1"))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_refused_withdrawal_can_be_retried_with_its_request_id_once_funded(
    ledger: Ledger,
) -> None:
    withdrawal = _transfer(
        "r_wd", "txn:wd_1", debit=AVAILABLE, credit=PAYOUTS, amount=500, non_negative=[AVAILABLE]
    )
    await _rejected(ledger.PostTransaction(withdrawal))
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture", amount=500))
    await ledger.PostTransaction(withdrawal)
    assert await _balance(ledger, AVAILABLE) == 0


async def test_withdrawal_to_exactly_zero_is_allowed(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture", amount=700))
    await ledger.PostTransaction(
        _transfer(
            "r2", "txn:wd_1", debit=AVAILABLE, credit=PAYOUTS, amount=700, non_negative=[AVAILABLE]
        )
    )
    assert await _balance(ledger, AVAILABLE) == 0


async def test_concurrent_withdrawals_never_overdraw(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r0", "txn:pay_1:capture", amount=100))
    attempts = [
        _transfer(
            f"r_wd_{i}",
            f"txn:wd_{i}",
            debit=AVAILABLE,
            credit=PAYOUTS,
            amount=30,
            non_negative=[AVAILABLE],
        )
        for i in range(10)
    ]
    results = await asyncio.gather(
        *(ledger.PostTransaction(a) for a in attempts), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, accounting_pb2.PostTransactionResponse)]
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(accepted) == 3
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert await _balance(ledger, AVAILABLE) == 10


async def test_unused_account_has_zero_balance_without_entries(ledger: Ledger) -> None:
    response = await ledger.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id="merchants/m_9/available", currency_code="USD")
    )
    assert response.balance.balance.amount_minor == 0
    assert response.balance.balance.currency_code == "USD"
    assert response.balance.entry_count == 0
    assert not response.balance.HasField("update_time")


async def test_balance_reports_debit_and_credit_totals(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:pay_1:capture", amount=1000))
    await ledger.PostTransaction(
        _transfer(
            "r2",
            "txn:ref_1",
            debit=AVAILABLE,
            credit=CLEARING,
            amount=300,
            kind=accounting_pb2.TRANSACTION_KIND_REFUND,
        )
    )
    response = await ledger.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=AVAILABLE, currency_code="EUR")
    )
    balance = response.balance
    assert (balance.credit_total.amount_minor, balance.debit_total.amount_minor) == (1000, 300)
    assert balance.balance.amount_minor == 700
    assert balance.entry_count == 2
    assert balance.HasField("update_time")


async def test_get_balance_needs_a_supported_currency(ledger: Ledger) -> None:
    error = await _rejected(
        ledger.GetBalance(accounting_pb2.GetBalanceRequest(account_id=AVAILABLE))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_transaction_is_not_found(ledger: Ledger) -> None:
    error = await _rejected(
        ledger.GetTransaction(accounting_pb2.GetTransactionRequest(transaction_id="txn:nope"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_entry_pages_cover_every_entry_of_the_account_once(ledger: Ledger) -> None:
    for index in range(7):
        await ledger.PostTransaction(_transfer(f"r{index}", f"txn:{index}", amount=index + 1))
    seen: list[str] = []
    token = ""
    while True:
        page = await ledger.ListEntries(
            accounting_pb2.ListEntriesRequest(account_id=AVAILABLE, page_size=3, page_token=token)
        )
        seen.extend(e.transaction_id for e in page.entries)
        assert all(e.account_id == AVAILABLE for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"txn:{i}" for i in range(7)]


async def test_entries_filter_by_currency(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:eur", currency="EUR"))
    await ledger.PostTransaction(_transfer("r2", "txn:usd", currency="USD"))
    page = await ledger.ListEntries(
        accounting_pb2.ListEntriesRequest(account_id=AVAILABLE, currency_code="USD")
    )
    assert [e.transaction_id for e in page.entries] == ["txn:usd"]


async def test_entry_page_token_of_another_account_is_rejected(ledger: Ledger) -> None:
    for index in range(3):
        await ledger.PostTransaction(_transfer(f"r{index}", f"txn:{index}"))
    page = await ledger.ListEntries(
        accounting_pb2.ListEntriesRequest(account_id=AVAILABLE, page_size=1)
    )
    error = await _rejected(
        ledger.ListEntries(
            accounting_pb2.ListEntriesRequest(account_id=CLEARING, page_token=page.next_page_token)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "PAGE_TOKEN_INVALID"


async def test_list_balances_covers_only_the_merchants_own_accounts(ledger: Ledger) -> None:
    await ledger.PostTransaction(_transfer("r1", "txn:1", credit="merchants/m_1/available"))
    await ledger.PostTransaction(
        _transfer("r2", "txn:2", credit="merchants/m_1/settling", currency="USD")
    )
    await ledger.PostTransaction(_transfer("r3", "txn:3", credit="merchants/m_10/available"))
    await ledger.PostTransaction(_transfer("r4", "txn:4", credit="merchants/mx1/available"))
    response = await ledger.ListBalances(accounting_pb2.ListBalancesRequest(merchant_id="m_1"))
    assert [(b.account_id, b.balance.currency_code) for b in response.balances] == [
        ("merchants/m_1/available", "EUR"),
        ("merchants/m_1/settling", "USD"),
    ]


async def test_balance_pages_cover_every_account_and_currency_once(ledger: Ledger) -> None:
    for index, currency in enumerate(["EUR", "USD", "GBP"]):
        await ledger.PostTransaction(_transfer(f"a{index}", f"txn:a{index}", currency=currency))
        await ledger.PostTransaction(
            _transfer(f"s{index}", f"txn:s{index}", credit=SETTLING, currency=currency)
        )
    seen: list[tuple[str, str]] = []
    token = ""
    while True:
        page = await ledger.ListBalances(
            accounting_pb2.ListBalancesRequest(merchant_id="m_1", page_size=4, page_token=token)
        )
        seen.extend((b.account_id, b.balance.currency_code) for b in page.balances)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted((a, c) for a in (AVAILABLE, SETTLING) for c in ("EUR", "GBP", "USD"))


# --- the ledger invariant under a random mix of postings --------------------------------------

ACCOUNTS = [CLEARING, PAYOUTS, AVAILABLE, SETTLING, "merchants/m_2/available"]
CURRENCIES = ["EUR", "USD", "JPY"]
_legs = st.lists(
    st.tuples(st.sampled_from(ACCOUNTS), st.integers(min_value=1, max_value=10**6)),
    min_size=1,
    max_size=3,
)


@st.composite
def _transactions(draw: st.DrawFn) -> tuple[list[accounting_pb2.Posting], list[str], bool]:
    """Postings (balanced, or skewed by a non-zero amount), non-negative guards, and balanced?"""
    postings: list[accounting_pb2.Posting] = []
    for currency in draw(
        st.lists(st.sampled_from(CURRENCIES), min_size=1, max_size=2, unique=True)
    ):
        debits = draw(_legs)
        credit_account = draw(st.sampled_from(ACCOUNTS))
        postings.extend(_posting(a, DEBIT, amount, currency) for a, amount in debits)
        postings.append(_posting(credit_account, CREDIT, sum(n for _, n in debits), currency))
    balanced = draw(st.booleans())
    if not balanced:
        victim = draw(st.integers(min_value=0, max_value=len(postings) - 1))
        postings[victim].amount.amount_minor += draw(st.integers(min_value=1, max_value=1000))
    guards = draw(st.lists(st.sampled_from(ACCOUNTS), max_size=2))
    return draw(st.permutations(postings)), guards, balanced


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batch=st.lists(_transactions(), min_size=1, max_size=12))
async def test_random_postings_keep_every_currency_summing_to_zero(
    batch: list[tuple[list[accounting_pb2.Posting], list[str], bool]],
) -> None:
    with tempfile.TemporaryDirectory() as var_dir:
        async with (
            running_service(NAME, build, environ={"PAYMESH_VAR_DIR": var_dir}) as address,
            granted_stub(address, accounting_pb2_grpc.AccountingServiceStub, NAME) as stub,
        ):
            posted: list[str] = []
            for index, (postings, guards, balanced) in enumerate(batch):
                request = accounting_pb2.PostTransactionRequest(
                    request_id=f"r{index}",
                    transaction_id=f"txn:{index}",
                    kind=accounting_pb2.TRANSACTION_KIND_ADJUSTMENT,
                    postings=postings,
                    non_negative_account_ids=guards,
                )
                try:
                    await stub.PostTransaction(request)
                except aio.AioRpcError as error:
                    expected = (
                        grpc.StatusCode.FAILED_PRECONDITION
                        if balanced
                        else grpc.StatusCode.INVALID_ARGUMENT
                    )
                    assert error.code() == expected
                    if not balanced:
                        assert error_reason(error) == "LEDGER_UNBALANCED"
                else:
                    assert balanced
                    posted.append(request.transaction_id)
                    for account in guards:
                        for currency in {p.amount.currency_code for p in postings}:
                            assert await _balance(stub, account, currency) >= 0
            for currency in CURRENCIES:
                total = 0
                for account in ACCOUNTS:
                    total += await _balance(stub, account, currency)
                assert total == 0
            for transaction_id in posted:
                found = await stub.GetTransaction(
                    accounting_pb2.GetTransactionRequest(transaction_id=transaction_id)
                )
                sums: dict[tuple[str, int], int] = {}
                for entry in found.transaction.entries:
                    key = (entry.amount.currency_code, entry.direction)
                    sums[key] = sums.get(key, 0) + entry.amount.amount_minor
                for currency in {c for c, _ in sums}:
                    assert sums.get((currency, DEBIT), 0) == sums.get((currency, CREDIT), 0)
