"""withdrawal-service through real gRPC against the real ledger, merchants, notifications and
bank sandbox.

The merchant must exist and be active. Payouts move the money to the merchant's
payout_in_transit account before the bank call, so concurrent withdrawals never exceed the
balance, and to platform/bank_payouts only once the bank confirmed; bank refusals move it
back; outages leave PENDING withdrawals (the ledger showing them in transit, not paid) that a
replay or the recovery loop completes, with the bank paid once. The merchant's webhook hears
of each. Mesh identities call the mTLS port; merchants read their own withdrawals on the
public port with their API key, and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.accounting.__main__ import build as build_accounting
from services.notification.__main__ import build as build_notification
from services.tools.sandbox.app import Fault, SandboxState
from services.withdrawal.__main__ import build as build_withdrawal
from tests.integration.tenants import (
    Directory,
    merchant_stub,
    refusal,
    rich_status,
    start_directory,
)
from tests.servers import (
    ServedAddress,
    ServicesUnderTest,
    error_reason,
    granted_stub,
    public_channel,
)

T = TypeVar("T")
EUR = "EUR"
PAYOUTS = "platform/bank_payouts"
#: The onboarded merchants' webhook: a ``.example`` host, played by the partner sandbox.
WEBHOOK_URL = "https://payouts.example/hooks"
WITHDRAWAL = "withdrawal-service"


def fast_recovery(var_dir: Path) -> dict[str, str]:
    """Recovery passes every 0.1 s, and breakers that half-open after 0.3 s (not 30 s), so a
    withdrawal left by an outage completes within a test's time once the bank is back."""
    policy = var_dir / "fast-breakers.toml"
    policy.write_text("[defaults.breaker]\nopen_s = 0.3\n")
    return {"WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S": "0.1", "PAYMESH_POLICY_FILE": str(policy)}


def available(merchant_id: str) -> str:
    return f"merchants/{merchant_id}/available"


def in_transit(merchant_id: str) -> str:
    return f"merchants/{merchant_id}/payout_in_transit"


@dataclass
class Mesh:
    """The stubs of a running withdrawal-service and its real downstreams."""

    withdrawals: withdrawal_pb2_grpc.WithdrawalServiceAsyncStub
    ledger: accounting_pb2_grpc.AccountingServiceAsyncStub
    notifications: notification_pb2_grpc.NotificationServiceAsyncStub
    bank: SandboxState
    environ: dict[str, str]
    directory: Directory
    address: ServedAddress
    merchant: str
    """An active merchant with a webhook URL, onboarded at merchant-service."""
    services: ServicesUnderTest
    """The harness running them all."""

    def as_merchant(self, secret: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """withdrawal-service's public port, called with API key ``secret``."""
        return merchant_stub(self.address.public, withdrawal_pb2_grpc.WithdrawalServiceStub, secret)


def withdrawal_service(
    services: ServicesUnderTest, environ: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[withdrawal_pb2_grpc.WithdrawalServiceAsyncStub]:
    """Another withdrawal-service among ``services`` for a block, ``environ`` on top of its
    own: a stub (as identities granted each method); on the same var dir it runs recovery."""
    return _granted(services.instance(WITHDRAWAL, build=build_withdrawal, environ=environ))


@contextlib.asynccontextmanager
async def _granted(
    instance: contextlib.AbstractAsyncContextManager[ServedAddress],
) -> AsyncIterator[withdrawal_pb2_grpc.WithdrawalServiceAsyncStub]:
    async with (
        instance as address,
        granted_stub(address, withdrawal_pb2_grpc.WithdrawalServiceStub, WITHDRAWAL) as stub,
    ):
        yield stub


def _ledger(environ: dict[str, str]) -> contextlib.AbstractAsyncContextManager[Any]:
    return granted_stub(
        environ["ACCOUNTING_SERVICE_ADDR"],
        accounting_pb2_grpc.AccountingServiceStub,
        "accounting-service",
    )


async def start_downstreams(services: ServicesUnderTest) -> tuple[Directory, SandboxState]:
    """The directory's merchants, then the sandbox, accounting- and notification-service;
    withdrawal-service's environ is ``services.environ_of(WITHDRAWAL)``."""
    directory = await start_directory(services)
    bank = services.sandbox()
    await services.start("accounting-service", build_accounting)
    await services.start("notification-service", build_notification)
    return directory, bank


@pytest.fixture
async def mesh(services: ServicesUnderTest) -> Mesh:
    directory, bank = await start_downstreams(services)
    environ = services.environ_of(WITHDRAWAL)
    address = await services.start(
        WITHDRAWAL, build_withdrawal, environ=fast_recovery(services.var_dir)
    )
    tenant = await directory.onboard("Payout Shop", webhook_url=WEBHOOK_URL)
    return Mesh(
        withdrawals=await services.stub(
            address, withdrawal_pb2_grpc.WithdrawalServiceStub, WITHDRAWAL
        ),
        ledger=await services.stack.enter_async_context(_ledger(environ)),
        notifications=await services.stub(
            environ["NOTIFICATION_SERVICE_ADDR"],
            notification_pb2_grpc.NotificationServiceStub,
            "notification-service",
        ),
        bank=bank,
        environ=environ,
        directory=directory,
        address=address,
        merchant=tenant.merchant_id,
        services=services,
    )


# -- helpers ------------------------------------------------------------------------------
def _money(amount: int, currency: str = EUR) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount, currency_code=currency)


async def fund(
    ledger: accounting_pb2_grpc.AccountingServiceAsyncStub,
    amount: int,
    *,
    account: str,
    tag: str = "1",
) -> None:
    """Credit ``account`` as a captured payment would (DEBIT platform/psp_clearing)."""
    await ledger.PostTransaction(
        accounting_pb2.PostTransactionRequest(
            request_id=f"fund-{tag}",
            transaction_id=f"txn:fund-{tag}",
            kind=accounting_pb2.TRANSACTION_KIND_PAYMENT,
            postings=[
                accounting_pb2.Posting(
                    account_id="platform/psp_clearing",
                    direction=accounting_pb2.ENTRY_DIRECTION_DEBIT,
                    amount=_money(amount),
                ),
                accounting_pb2.Posting(
                    account_id=account,
                    direction=accounting_pb2.ENTRY_DIRECTION_CREDIT,
                    amount=_money(amount),
                ),
            ],
        )
    )


async def balance(ledger: accounting_pb2_grpc.AccountingServiceAsyncStub, account: str) -> int:
    reply = await ledger.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=account, currency_code=EUR)
    )
    return reply.balance.balance.amount_minor


def _withdraw(
    request_id: str, amount: int, *, merchant_id: str, settlement_id: str = ""
) -> withdrawal_pb2.CreateWithdrawalRequest:
    return withdrawal_pb2.CreateWithdrawalRequest(
        request_id=request_id,
        merchant_id=merchant_id,
        amount=_money(amount),
        bank_account_reference="DE89370400440532013000",
        settlement_id=settlement_id,
    )


def fail_bank(bank: SandboxState, status: int) -> None:
    with bank.lock:
        bank.faults["bank-transfer"] = Fault(error_rate=1.0, status=status)


def heal_bank(bank: SandboxState) -> None:
    with bank.lock:
        bank.faults.clear()


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
        await asyncio.sleep(0.05)


# -- tests --------------------------------------------------------------------------------
async def test_withdrawal_pays_out_through_the_bank_and_posts_the_ledger(mesh: Mesh) -> None:
    await fund(mesh.ledger, 10_000, account=available(mesh.merchant))

    reply = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 4_000, merchant_id=mesh.merchant)
    )

    withdrawal = reply.withdrawal
    assert withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert withdrawal.ledger_transaction_id == f"txn:{withdrawal.withdrawal_id}"
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 6_000
    assert await balance(mesh.ledger, "platform/bank_payouts") == 4_000
    assert list(mesh.bank.transfers) == [withdrawal.bank_transfer_reference]
    assert mesh.bank.transfer_keys == {withdrawal.withdrawal_id: withdrawal.bank_transfer_reference}


async def test_completed_withdrawal_notifies_the_merchant(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, account=available(mesh.merchant))
    await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 1_000, merchant_id=mesh.merchant))

    listed = await mesh.notifications.ListNotifications(
        notification_pb2.ListNotificationsRequest(merchant_id=mesh.merchant)
    )

    assert [n.event_type for n in listed.notifications] == ["withdrawal.completed"]


async def test_withdrawal_above_the_balance_is_failed_precondition(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, account=available(mesh.merchant))

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 1_001, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "INSUFFICIENT_BALANCE"
    assert mesh.bank.transfers == {}
    listed = await mesh.withdrawals.ListWithdrawals(
        withdrawal_pb2.ListWithdrawalsRequest(merchant_id=mesh.merchant)
    )
    assert list(listed.withdrawals) == []


async def test_refused_request_id_may_be_retried_once_funds_arrive(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError):
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 500, merchant_id=mesh.merchant))
    await fund(mesh.ledger, 500, account=available(mesh.merchant))

    reply = await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 500, merchant_id=mesh.merchant))

    assert reply.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED


async def test_concurrent_withdrawals_never_exceed_the_balance(mesh: Mesh, engine: str) -> None:
    await fund(mesh.ledger, 10_000, account=available(mesh.merchant))

    results = await asyncio.gather(
        *(
            mesh.withdrawals.CreateWithdrawal(_withdraw(f"w{i}", 1_500, merchant_id=mesh.merchant))
            for i in range(10)
        ),
        return_exceptions=True,
    )

    accepted = [
        r.withdrawal for r in results if isinstance(r, withdrawal_pb2.CreateWithdrawalResponse)
    ]
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(accepted) + len(refused) == 10
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
    assert all(w.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED for w in accepted)
    assert len(accepted) == 6  # 6 x 1 500 fits in 10 000, a seventh does not
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 10_000 - 9_000
    assert len(mesh.bank.transfers) == len(accepted)


async def test_replayed_request_id_returns_the_same_withdrawal_and_pays_once(
    mesh: Mesh,
) -> None:
    await fund(mesh.ledger, 5_000, account=available(mesh.merchant))

    first = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_000, merchant_id=mesh.merchant)
    )
    again = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_000, merchant_id=mesh.merchant)
    )

    assert again.withdrawal == first.withdrawal
    assert len(mesh.bank.transfers) == 1
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 3_000


async def test_request_id_reused_with_another_body_is_invalid_argument(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, account=available(mesh.merchant))
    await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 2_000, merchant_id=mesh.merchant))

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 2_001, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"


async def test_bank_refusal_fails_the_withdrawal_and_reverses_the_reservation(
    mesh: Mesh,
) -> None:
    await fund(mesh.ledger, 3_000, account=available(mesh.merchant))
    fail_bank(mesh.bank, 422)

    reply = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_000, merchant_id=mesh.merchant)
    )

    withdrawal = reply.withdrawal
    assert withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_FAILED
    assert withdrawal.failure_reason == "CHANNEL_DECLINED"
    reversal = await mesh.ledger.GetTransaction(
        accounting_pb2.GetTransactionRequest(
            transaction_id=f"txn:{withdrawal.withdrawal_id}:reversal"
        )
    )
    assert reversal.transaction.kind == accounting_pb2.TRANSACTION_KIND_REVERSAL
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 3_000
    assert await balance(mesh.ledger, "platform/bank_payouts") == 0


async def test_unreachable_bank_leaves_pending_until_a_replay_completes_it(mesh: Mesh) -> None:
    await fund(mesh.ledger, 3_000, account=available(mesh.merchant))
    fail_bank(mesh.bank, 503)
    pending = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_000, merchant_id=mesh.merchant)
    )
    assert pending.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_PENDING
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 1_000

    heal_bank(mesh.bank)
    replay = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_000, merchant_id=mesh.merchant)
    )

    assert replay.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert len(mesh.bank.transfers) == 1
    assert await balance(mesh.ledger, "platform/bank_payouts") == 2_000


async def test_recovery_at_start_completes_a_pending_withdrawal(
    services: ServicesUnderTest,
) -> None:
    directory, bank = await start_downstreams(services)
    environ = services.environ_of(WITHDRAWAL)
    async with _ledger(environ) as ledger:
        merchant = (await directory.onboard()).merchant_id
        await fund(ledger, 3_000, account=available(merchant))
        fail_bank(bank, 503)
        async with withdrawal_service(services, environ) as withdrawals:
            pending = await withdrawals.CreateWithdrawal(
                _withdraw("w1", 2_000, merchant_id=merchant)
            )
        assert pending.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_PENDING
        heal_bank(bank)

        async with withdrawal_service(services, environ) as withdrawals:
            request = withdrawal_pb2.GetWithdrawalRequest(
                withdrawal_id=pending.withdrawal.withdrawal_id
            )
            final = await eventually(
                lambda: withdrawals.GetWithdrawal(request),
                lambda r: r.withdrawal.status != withdrawal_pb2.WITHDRAWAL_STATUS_PENDING,
            )

        assert final.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
        assert len(bank.transfers) == 1
        assert await balance(ledger, "platform/bank_payouts") == 2_000


async def test_withdrawal_of_a_settlement_debits_the_settling_account(mesh: Mesh) -> None:
    await fund(mesh.ledger, 2_500, account=f"merchants/{mesh.merchant}/settling")

    reply = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_500, settlement_id="stl_1", merchant_id=mesh.merchant)
    )

    assert reply.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert reply.withdrawal.settlement_id == "stl_1"
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/settling") == 0
    assert await balance(mesh.ledger, f"merchants/{mesh.merchant}/available") == 0


async def test_second_withdrawal_of_one_settlement_is_already_exists(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, account=f"merchants/{mesh.merchant}/settling")
    await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w1", 2_500, settlement_id="stl_1", merchant_id=mesh.merchant)
    )

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(
            _withdraw("w2", 2_500, settlement_id="stl_1", merchant_id=mesh.merchant)
        )

    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(mesh.bank.transfers) == 1


# -- the ledger shows money in transit until the bank confirms; the loop finishes outages --------


async def test_withdrawal_is_in_transit_until_the_bank_confirms_then_paid_out(mesh: Mesh) -> None:
    await fund(mesh.ledger, 3_000, account=available(mesh.merchant))
    fail_bank(mesh.bank, 503)
    pending = (
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 2_000, merchant_id=mesh.merchant))
    ).withdrawal
    assert pending.status == withdrawal_pb2.WITHDRAWAL_STATUS_PENDING
    assert (
        await balance(mesh.ledger, available(mesh.merchant)),
        await balance(mesh.ledger, in_transit(mesh.merchant)),
        await balance(mesh.ledger, PAYOUTS),
    ) == (1_000, 2_000, 0)

    heal_bank(mesh.bank)
    request = withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=pending.withdrawal_id)
    final = await eventually(
        lambda: mesh.withdrawals.GetWithdrawal(request),
        lambda r: r.withdrawal.status != withdrawal_pb2.WITHDRAWAL_STATUS_PENDING,
    )

    assert final.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert (
        await balance(mesh.ledger, in_transit(mesh.merchant)),
        await balance(mesh.ledger, PAYOUTS),
    ) == (0, 2_000)
    paid = await mesh.ledger.GetTransaction(
        accounting_pb2.GetTransactionRequest(transaction_id=f"txn:{pending.withdrawal_id}:paid")
    )
    assert [e.account_id for e in paid.transaction.entries] == [in_transit(mesh.merchant), PAYOUTS]
    assert len(mesh.bank.transfers) == 1


async def test_recovery_loop_retries_until_the_bank_is_back(
    services: ServicesUnderTest,
) -> None:
    directory, bank = await start_downstreams(services)
    environ = services.environ_of(WITHDRAWAL)
    async with _ledger(environ) as ledger:
        merchant = (await directory.onboard()).merchant_id
        await fund(ledger, 1_000, account=available(merchant))
        fail_bank(bank, 503)
        async with withdrawal_service(services, fast_recovery(services.var_dir)) as withdrawals:
            pending = (
                await withdrawals.CreateWithdrawal(_withdraw("w1", 1_000, merchant_id=merchant))
            ).withdrawal
            # Passes keep asking the bank while it is down ...
            asked = bank.requests.get("bank-transfer", 0)
            await eventually(
                lambda: asyncio.sleep(0, bank.requests.get("bank-transfer", 0)),
                lambda seen: seen > asked,
            )
            request = withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=pending.withdrawal_id)
            still = await withdrawals.GetWithdrawal(request)
            assert still.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_PENDING
            assert await balance(ledger, PAYOUTS) == 0
            # ... and a pass after it is back completes the withdrawal, with no replay.
            heal_bank(bank)
            final = await eventually(
                lambda: withdrawals.GetWithdrawal(request),
                lambda r: r.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED,
            )
        assert final.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
        assert len(bank.transfers) == 1
        assert await balance(ledger, PAYOUTS) == 1_000


async def test_completed_withdrawal_reaches_the_merchants_webhook(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, account=available(mesh.merchant))
    withdrawal = (
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 1_000, merchant_id=mesh.merchant))
    ).withdrawal

    def delivered() -> list[dict[str, Any]]:
        with mesh.bank.lock:
            return [w for w in mesh.bank.webhooks if w.get("merchant_id") == mesh.merchant]

    webhooks = await eventually(lambda: asyncio.sleep(0, delivered()), bool)
    [webhook] = webhooks
    assert webhook["event_type"] == "withdrawal.completed"
    assert webhook["payload"]["withdrawal_id"] == withdrawal.withdrawal_id
    assert webhook["payload"]["status"] == "WITHDRAWAL_STATUS_COMPLETED"
    listed = await mesh.notifications.ListNotifications(
        notification_pb2.ListNotificationsRequest(merchant_id=mesh.merchant)
    )
    [notification] = listed.notifications
    assert notification.delivery_status == notification_pb2.DELIVERY_STATUS_DELIVERED
    assert notification.webhook_url == WEBHOOK_URL
    assert webhook["idempotency_key"] == notification.notification_id


# -- only an existing, active merchant is paid out ---------------------------------------------


async def test_unknown_merchant_is_not_found_and_nothing_moves(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 100, merchant_id="m_nobody"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"
    assert await balance(mesh.ledger, in_transit("m_nobody")) == 0
    assert mesh.bank.transfers == {}


async def test_suspended_merchant_cannot_be_paid_out(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, account=available(mesh.merchant))
    await mesh.directory.suspend(mesh.merchant)

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 500, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MERCHANT_INACTIVE"
    assert await balance(mesh.ledger, available(mesh.merchant)) == 1_000
    assert mesh.bank.transfers == {}


async def test_unreachable_merchant_service_is_unavailable_and_leaves_the_request_id_free(
    mesh: Mesh,
) -> None:
    await fund(mesh.ledger, 500, account=available(mesh.merchant))
    cut_off = {**mesh.environ, "MERCHANT_SERVICE_ADDR": "127.0.0.1:1"}
    async with withdrawal_service(mesh.services, cut_off) as withdrawals:
        with pytest.raises(aio.AioRpcError) as caught:
            await withdrawals.CreateWithdrawal(_withdraw("w1", 500, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "DOWNSTREAM_UNAVAILABLE"
    details = rich_status(caught.value).details
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
    reply = await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 500, merchant_id=mesh.merchant))
    assert reply.withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED


def _bad(**changes: object) -> withdrawal_pb2.CreateWithdrawalRequest:
    request = _withdraw("w1", 100, merchant_id="m_1")
    for name, value in changes.items():
        if name == "amount_minor":
            request.amount.amount_minor = value  # type: ignore[assignment]  # test table
        elif name == "currency_code":
            request.amount.currency_code = value  # type: ignore[assignment]  # test table
        else:
            setattr(request, name, value)
    return request


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount_minor": 0}, "amount.amount_minor"),
        ({"amount_minor": -5}, "amount.amount_minor"),
        ({"amount_minor": 10**13}, "amount.amount_minor"),
        ({"currency_code": "XXX"}, "amount.currency_code"),
        ({"request_id": ""}, "request_id"),
        ({"merchant_id": "no spaces"}, "merchant_id"),
        ({"bank_account_reference": ""}, "bank_account_reference"),
        ({"bank_account_reference": "x" * 65}, "bank_account_reference"),
        ({"settlement_id": "bad/id"}, "settlement_id"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    mesh: Mesh, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.CreateWithdrawal(_bad(**changes))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_unknown_withdrawal_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.withdrawals.GetWithdrawal(
            withdrawal_pb2.GetWithdrawalRequest(withdrawal_id="wd_missing")
        )

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pages_cover_every_withdrawal_once_newest_first(mesh: Mesh) -> None:
    await fund(mesh.ledger, 700, account=available(mesh.merchant))
    created = [
        (
            await mesh.withdrawals.CreateWithdrawal(
                _withdraw(f"w{i}", 100, merchant_id=mesh.merchant)
            )
        ).withdrawal.withdrawal_id
        for i in range(7)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await mesh.withdrawals.ListWithdrawals(
            withdrawal_pb2.ListWithdrawalsRequest(
                merchant_id=mesh.merchant, page_size=3, page_token=token
            )
        )
        seen.extend(w.withdrawal_id for w in page.withdrawals)
        token = page.next_page_token
        if not token:
            break

    assert seen == created[::-1]


async def test_list_filters_by_status(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, account=available(mesh.merchant))
    await mesh.withdrawals.CreateWithdrawal(_withdraw("w1", 100, merchant_id=mesh.merchant))
    fail_bank(mesh.bank, 422)
    failed = await mesh.withdrawals.CreateWithdrawal(
        _withdraw("w2", 100, merchant_id=mesh.merchant)
    )

    listed = await mesh.withdrawals.ListWithdrawals(
        withdrawal_pb2.ListWithdrawalsRequest(
            merchant_id=mesh.merchant, status=withdrawal_pb2.WITHDRAWAL_STATUS_FAILED
        )
    )

    assert [w.withdrawal_id for w in listed.withdrawals] == [failed.withdrawal.withdrawal_id]


# -- merchants calling with their API key -----------------------------------------------------

#: A well-formed withdrawal id no withdrawal has.
MISSING_WITHDRAWAL = "wd_000000000000000000000000"


async def _paid_out(mesh: Mesh, merchant_id: str, request_id: str, amount: int = 500) -> Any:
    """A completed withdrawal of ``merchant_id`` (funded first), made by settlement-service."""
    await fund(mesh.ledger, amount, account=f"merchants/{merchant_id}/available", tag=request_id)
    reply = await mesh.withdrawals.CreateWithdrawal(
        _withdraw(request_id, amount, merchant_id=merchant_id)
    )
    return reply.withdrawal


async def test_another_merchants_withdrawal_is_not_found_exactly_like_a_missing_one(
    mesh: Mesh,
) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    other = await mesh.directory.onboard("Other Shop")
    theirs = await _paid_out(mesh, other.merchant_id, "w1")
    async with mesh.as_merchant(tenant.secret) as withdrawals:
        with pytest.raises(aio.AioRpcError) as foreign:
            await withdrawals.GetWithdrawal(
                withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=theirs.withdrawal_id)
            )
        with pytest.raises(aio.AioRpcError) as missing:
            await withdrawals.GetWithdrawal(
                withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=MISSING_WITHDRAWAL)
            )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert refusal(foreign.value, resource_id=theirs.withdrawal_id) == refusal(
        missing.value, resource_id=MISSING_WITHDRAWAL
    )
    async with mesh.as_merchant(other.secret) as withdrawals:
        own = await withdrawals.GetWithdrawal(
            withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=theirs.withdrawal_id)
        )
    assert own.withdrawal == theirs


async def test_merchant_lists_only_its_own_withdrawals(mesh: Mesh) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    other = await mesh.directory.onboard("Other Shop")
    mine = await _paid_out(mesh, tenant.merchant_id, "w1")
    await _paid_out(mesh, other.merchant_id, "w2")
    async with mesh.as_merchant(tenant.secret) as withdrawals:
        listed = await withdrawals.ListWithdrawals(withdrawal_pb2.ListWithdrawalsRequest())
        with pytest.raises(aio.AioRpcError) as caught:
            await withdrawals.ListWithdrawals(
                withdrawal_pb2.ListWithdrawalsRequest(merchant_id=other.merchant_id)
            )
    assert [w.withdrawal_id for w in listed.withdrawals] == [mine.withdrawal_id]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"


async def test_merchant_call_without_api_key_is_credentials_missing(mesh: Mesh) -> None:
    async with public_channel(mesh.address.public) as channel:
        withdrawals = withdrawal_pb2_grpc.WithdrawalServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await withdrawals.GetWithdrawal(
                withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=MISSING_WITHDRAWAL)
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "CREDENTIALS_MISSING"


async def test_merchant_call_with_a_bad_api_key_is_unauthenticated(mesh: Mesh) -> None:
    async with mesh.as_merchant("sk_0123456789abcdef_" + "A" * 43) as withdrawals:
        with pytest.raises(aio.AioRpcError) as caught:
            await withdrawals.ListWithdrawals(withdrawal_pb2.ListWithdrawalsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "API_KEY_INVALID"


async def test_merchant_key_cannot_create_a_withdrawal(mesh: Mesh) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    await fund(mesh.ledger, 1_000, account=f"merchants/{tenant.merchant_id}/available")
    async with mesh.as_merchant(tenant.secret) as withdrawals:
        with pytest.raises(aio.AioRpcError) as caught:
            await withdrawals.CreateWithdrawal(
                _withdraw("w1", 1_000, merchant_id=tenant.merchant_id)
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.bank.transfers == {}
