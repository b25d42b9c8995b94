"""settlement-service through real gRPC against real accounting, withdrawal and notification.

A settlement moves the merchant's available balance to settling in the ledger (which refuses
an overdraft atomically) and has withdrawal-service pay it out through the bank sandbox; a
failed payout returns the funds; an unreachable withdrawal-service is finished on restart.
The operator and mesh identities call the mTLS port; merchants read their own balance and
settlements on the public port with their API key, and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.accounting.__main__ import build as build_accounting
from services.notification.__main__ import build as build_notification
from services.settlement.__main__ import build as build_settlement
from services.tools.sandbox.app import Fault, SandboxState
from services.withdrawal.__main__ import build as build_withdrawal
from tests.integration.tenants import Directory, merchant_stub, refusal, start_directory
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
WEBHOOK_URL = "https://settled.example/hooks"
SETTLEMENT = "settlement-service"


def available(merchant_id: str) -> str:
    return f"merchants/{merchant_id}/available"


def settling(merchant_id: str) -> str:
    return f"merchants/{merchant_id}/settling"


def in_transit(merchant_id: str) -> str:
    return f"merchants/{merchant_id}/payout_in_transit"


def fast_recovery(var_dir: Path) -> dict[str, str]:
    """Recovery passes of settlements and withdrawals every 0.1 s, and breakers that
    half-open after 0.3 s (not 30 s), so work left by an outage completes in a test's time."""
    policy = var_dir / "fast-breakers.toml"
    policy.write_text("[defaults.breaker]\nopen_s = 0.3\n")
    return {
        "SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S": "0.1",
        "WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S": "0.1",
        "PAYMESH_POLICY_FILE": str(policy),
    }


@dataclass
class Mesh:
    """Stubs of a running settlement-service and its real downstreams."""

    settlements: settlement_pb2_grpc.SettlementServiceAsyncStub
    withdrawals: withdrawal_pb2_grpc.WithdrawalServiceAsyncStub
    ledger: accounting_pb2_grpc.AccountingServiceAsyncStub
    bank: SandboxState
    directory: Directory
    address: ServedAddress
    merchant: str
    """An active merchant with a webhook URL, onboarded at merchant-service."""
    environ: dict[str, str]
    """settlement-service's environment (its downstreams' addresses)."""
    services: ServicesUnderTest
    """The harness running them all."""

    def as_merchant(self, secret: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """settlement-service's public port, called with API key ``secret``."""
        return merchant_stub(self.address.public, settlement_pb2_grpc.SettlementServiceStub, secret)


def settlement_service(
    services: ServicesUnderTest, environ: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[settlement_pb2_grpc.SettlementServiceAsyncStub]:
    """Another settlement-service among ``services`` for a block, ``environ`` on top of its
    own; on the same var dir it runs recovery at start."""
    return _operator_stub(services.instance(SETTLEMENT, build=build_settlement, environ=environ))


@contextlib.asynccontextmanager
async def _operator_stub(
    instance: contextlib.AbstractAsyncContextManager[ServedAddress],
) -> AsyncIterator[settlement_pb2_grpc.SettlementServiceAsyncStub]:
    async with (
        instance as address,
        granted_stub(address, settlement_pb2_grpc.SettlementServiceStub, SETTLEMENT) as stub,
    ):
        yield stub


def _ledger(environ: dict[str, str]) -> contextlib.AbstractAsyncContextManager[Any]:
    return granted_stub(
        environ["ACCOUNTING_SERVICE_ADDR"],
        accounting_pb2_grpc.AccountingServiceStub,
        "accounting-service",
    )


async def start_downstreams(services: ServicesUnderTest) -> tuple[Directory, SandboxState]:
    """The directory's merchants, then the sandbox, accounting, notification and withdrawal
    (with :func:`fast_recovery`); settlement-service's environ is
    ``services.environ_of(SETTLEMENT)``."""
    directory = await start_directory(services)
    bank = services.sandbox()
    services.environ.update(fast_recovery(services.var_dir))
    await services.start("accounting-service", build_accounting)
    await services.start("notification-service", build_notification)
    await services.start("withdrawal-service", build_withdrawal)
    return directory, bank


@pytest.fixture
async def mesh(services: ServicesUnderTest) -> Mesh:
    directory, bank = await start_downstreams(services)
    address = await services.start(SETTLEMENT, build_settlement)
    environ = services.environ_of(SETTLEMENT)
    tenant = await directory.onboard("Settled Shop", webhook_url=WEBHOOK_URL)
    return Mesh(
        settlements=await services.stub(
            address, settlement_pb2_grpc.SettlementServiceStub, SETTLEMENT
        ),
        withdrawals=await services.stub(
            environ["WITHDRAWAL_SERVICE_ADDR"],
            withdrawal_pb2_grpc.WithdrawalServiceStub,
            "withdrawal-service",
        ),
        ledger=await services.stack.enter_async_context(_ledger(environ)),
        bank=bank,
        directory=directory,
        address=address,
        merchant=tenant.merchant_id,
        environ=environ,
        services=services,
    )


# -- helpers ------------------------------------------------------------------------------
def _money(amount: int, currency: str = EUR) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount, currency_code=currency)


async def fund(
    ledger: accounting_pb2_grpc.AccountingServiceAsyncStub,
    amount: int,
    *,
    merchant_id: str,
) -> None:
    """Credit the merchant's available balance as a captured payment would."""
    await ledger.PostTransaction(
        accounting_pb2.PostTransactionRequest(
            request_id=f"fund-{merchant_id}",
            transaction_id=f"txn:fund-{merchant_id}",
            kind=accounting_pb2.TRANSACTION_KIND_PAYMENT,
            postings=[
                accounting_pb2.Posting(
                    account_id="platform/psp_clearing",
                    direction=accounting_pb2.ENTRY_DIRECTION_DEBIT,
                    amount=_money(amount),
                ),
                accounting_pb2.Posting(
                    account_id=f"merchants/{merchant_id}/available",
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


def _settle(
    request_id: str, amount: int | None = None, *, merchant_id: str
) -> settlement_pb2.CreateSettlementRequest:
    request = settlement_pb2.CreateSettlementRequest(
        request_id=request_id,
        merchant_id=merchant_id,
        currency_code=EUR,
        bank_account_reference="FR7630006000011234567890189",
    )
    if amount is not None:
        request.amount.CopyFrom(_money(amount))
    return request


def fail_bank(bank: SandboxState, status: int = 503) -> None:
    with bank.lock:
        bank.faults["bank-transfer"] = Fault(error_rate=1.0, status=status)


def heal_bank(bank: SandboxState) -> None:
    with bank.lock:
        bank.faults.clear()


def _webhooks(mesh: Mesh) -> list[dict[str, Any]]:
    """What the merchant's webhook (played by the sandbox) received."""
    with mesh.bank.lock:
        return [w for w in mesh.bank.webhooks if w.get("merchant_id") == mesh.merchant]


def free_address() -> str:
    """A loopback address nothing listens on (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


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
async def test_settleable_balance_is_the_available_ledger_balance(mesh: Mesh) -> None:
    await fund(mesh.ledger, 12_345, merchant_id=mesh.merchant)

    reply = await mesh.settlements.GetSettleableBalance(
        settlement_pb2.GetSettleableBalanceRequest(merchant_id=mesh.merchant, currency_code=EUR)
    )

    assert reply.settleable_amount == _money(12_345)
    assert reply.as_of_time.seconds > 0


async def test_settleable_balance_of_an_unused_account_is_zero(mesh: Mesh) -> None:
    reply = await mesh.settlements.GetSettleableBalance(
        settlement_pb2.GetSettleableBalanceRequest(merchant_id=mesh.merchant, currency_code="JPY")
    )

    assert reply.settleable_amount == _money(0, "JPY")


async def test_settling_the_whole_balance_pays_it_out_through_a_withdrawal(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, merchant_id=mesh.merchant)

    reply = await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    settlement = reply.settlement
    assert settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED
    assert settlement.amount == _money(5_000)
    assert settlement.ledger_transaction_id == f"txn:{settlement.settlement_id}"
    withdrawal = (
        await mesh.withdrawals.GetWithdrawal(
            withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=settlement.withdrawal_id)
        )
    ).withdrawal
    assert withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert withdrawal.settlement_id == settlement.settlement_id
    assert (
        await balance(mesh.ledger, available(mesh.merchant)),
        await balance(mesh.ledger, settling(mesh.merchant)),
    ) == (0, 0)
    assert await balance(mesh.ledger, PAYOUTS) == 5_000
    assert len(mesh.bank.transfers) == 1


async def test_partial_settlement_leaves_the_rest_available(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, merchant_id=mesh.merchant)

    reply = await mesh.settlements.CreateSettlement(_settle("s1", 1_200, merchant_id=mesh.merchant))

    assert reply.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED
    assert await balance(mesh.ledger, available(mesh.merchant)) == 3_800
    assert await balance(mesh.ledger, PAYOUTS) == 1_200


async def test_settling_more_than_available_is_failed_precondition(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, merchant_id=mesh.merchant)

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_settle("s1", 1_001, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "INSUFFICIENT_BALANCE"
    assert await balance(mesh.ledger, available(mesh.merchant)) == 1_000
    assert mesh.bank.transfers == {}
    listed = await mesh.settlements.ListSettlements(
        settlement_pb2.ListSettlementsRequest(merchant_id=mesh.merchant)
    )
    assert list(listed.settlements) == []


async def test_settling_an_empty_balance_is_failed_precondition(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "INSUFFICIENT_BALANCE"


async def test_replayed_request_id_settles_and_pays_once(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, merchant_id=mesh.merchant)

    first = await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))
    again = await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    assert again.settlement == first.settlement
    assert len(mesh.bank.transfers) == 1
    assert await balance(mesh.ledger, PAYOUTS) == 5_000


async def test_request_id_reused_with_another_body_is_invalid_argument(mesh: Mesh) -> None:
    await fund(mesh.ledger, 5_000, merchant_id=mesh.merchant)
    await mesh.settlements.CreateSettlement(_settle("s1", 100, merchant_id=mesh.merchant))

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_settle("s1", 200, merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"


async def test_concurrent_settlements_never_overdraw_the_balance(mesh: Mesh) -> None:
    await fund(mesh.ledger, 10_000, merchant_id=mesh.merchant)

    results = await asyncio.gather(
        *(
            mesh.settlements.CreateSettlement(_settle(f"s{i}", 3_000, merchant_id=mesh.merchant))
            for i in range(6)
        ),
        return_exceptions=True,
    )

    accepted = [
        r.settlement for r in results if isinstance(r, settlement_pb2.CreateSettlementResponse)
    ]
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
    assert len(accepted) == 3  # 3 x 3 000 fits in 10 000, a fourth does not
    assert await balance(mesh.ledger, available(mesh.merchant)) == 1_000
    assert await balance(mesh.ledger, PAYOUTS) == 9_000


async def test_failed_payout_fails_the_settlement_and_returns_the_funds(mesh: Mesh) -> None:
    await fund(mesh.ledger, 4_000, merchant_id=mesh.merchant)
    with mesh.bank.lock:
        mesh.bank.faults["bank-transfer"] = Fault(error_rate=1.0, status=422)

    reply = await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    assert reply.settlement.status == settlement_pb2.SETTLEMENT_STATUS_FAILED
    assert reply.settlement.failure_reason == "CHANNEL_DECLINED"
    assert await balance(mesh.ledger, available(mesh.merchant)) == 4_000
    assert (
        await balance(mesh.ledger, settling(mesh.merchant)),
        await balance(mesh.ledger, PAYOUTS),
    ) == (0, 0)


async def test_recovery_at_start_completes_a_settlement_left_pending(
    services: ServicesUnderTest,
) -> None:
    directory, bank = await start_downstreams(services)
    environ = services.environ_of(SETTLEMENT)
    async with _ledger(environ) as ledger:
        merchant = (await directory.onboard()).merchant_id
        await fund(ledger, 2_000, merchant_id=merchant)
        cut_off = {**environ, "WITHDRAWAL_SERVICE_ADDR": free_address()}
        async with settlement_service(services, cut_off) as settlements:
            pending = await settlements.CreateSettlement(_settle("s1", merchant_id=merchant))
        assert pending.settlement.status == settlement_pb2.SETTLEMENT_STATUS_PENDING
        assert await balance(ledger, settling(merchant)) == 2_000

        async with settlement_service(services, environ) as settlements:
            request = settlement_pb2.GetSettlementRequest(
                settlement_id=pending.settlement.settlement_id
            )
            final = await eventually(
                lambda: settlements.GetSettlement(request),
                lambda r: r.settlement.status != settlement_pb2.SETTLEMENT_STATUS_PENDING,
            )

        assert final.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED
        assert len(bank.transfers) == 1
        assert (await balance(ledger, settling(merchant)), await balance(ledger, PAYOUTS)) == (
            0,
            2_000,
        )


# -- a bank outage: the loops finish the work, the ledger shows where the money is -------------


async def test_settlement_left_pending_by_a_bank_outage_completes_by_itself(mesh: Mesh) -> None:
    await fund(mesh.ledger, 3_000, merchant_id=mesh.merchant)
    fail_bank(mesh.bank)
    pending = (
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))
    ).settlement
    assert pending.status == settlement_pb2.SETTLEMENT_STATUS_PENDING
    # Handed to the bank, not paid out: the money is in transit, and nowhere else.
    assert [
        await balance(mesh.ledger, account)
        for account in (
            available(mesh.merchant),
            settling(mesh.merchant),
            in_transit(mesh.merchant),
            PAYOUTS,
        )
    ] == [0, 0, 3_000, 0]

    heal_bank(mesh.bank)
    request = settlement_pb2.GetSettlementRequest(settlement_id=pending.settlement_id)
    final = await eventually(
        lambda: mesh.settlements.GetSettlement(request),
        lambda r: r.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED,
    )

    assert final.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED
    assert [
        await balance(mesh.ledger, account)
        for account in (
            available(mesh.merchant),
            settling(mesh.merchant),
            in_transit(mesh.merchant),
            PAYOUTS,
        )
    ] == [0, 0, 0, 3_000]
    assert len(mesh.bank.transfers) == 1


async def test_merchant_hears_of_its_settlement_and_its_payout(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, merchant_id=mesh.merchant)
    settlement = (
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))
    ).settlement

    webhooks = await eventually(lambda: asyncio.sleep(0, _webhooks(mesh)), lambda w: len(w) >= 2)

    by_type = {w["event_type"]: w["payload"] for w in webhooks}
    assert set(by_type) == {"settlement.completed", "withdrawal.completed"}
    assert by_type["settlement.completed"]["settlement_id"] == settlement.settlement_id
    assert by_type["settlement.completed"]["withdrawal_id"] == settlement.withdrawal_id
    assert by_type["withdrawal.completed"]["settlement_id"] == settlement.settlement_id


async def test_merchant_hears_of_a_failed_settlement(mesh: Mesh) -> None:
    await fund(mesh.ledger, 1_000, merchant_id=mesh.merchant)
    fail_bank(mesh.bank, 422)
    settlement = (
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))
    ).settlement
    assert settlement.status == settlement_pb2.SETTLEMENT_STATUS_FAILED

    webhooks = await eventually(lambda: asyncio.sleep(0, _webhooks(mesh)), lambda w: len(w) >= 2)

    by_type = {w["event_type"]: w["payload"] for w in webhooks}
    assert set(by_type) == {"settlement.failed", "withdrawal.failed"}
    assert by_type["settlement.failed"]["failure_reason"] == "CHANNEL_DECLINED"


# -- only an existing, active merchant is settled ----------------------------------------------


@pytest.mark.parametrize("amount", [None, 100], ids=["whole-balance", "amount"])
async def test_unknown_merchant_is_not_found(mesh: Mesh, amount: int | None) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_settle("s1", amount, merchant_id="m_nobody"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"


async def test_settleable_balance_of_an_unknown_merchant_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.GetSettleableBalance(
            settlement_pb2.GetSettleableBalanceRequest(merchant_id="m_nobody", currency_code=EUR)
        )

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"


async def test_suspended_merchant_cannot_be_settled_but_sees_its_balance(mesh: Mesh) -> None:
    await fund(mesh.ledger, 2_000, merchant_id=mesh.merchant)
    await mesh.directory.suspend(mesh.merchant)

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MERCHANT_INACTIVE"
    assert await balance(mesh.ledger, available(mesh.merchant)) == 2_000
    assert mesh.bank.transfers == {}
    reply = await mesh.settlements.GetSettleableBalance(
        settlement_pb2.GetSettleableBalanceRequest(merchant_id=mesh.merchant, currency_code=EUR)
    )
    assert reply.settleable_amount == _money(2_000)


async def test_unreachable_merchant_service_is_unavailable_and_leaves_the_request_id_free(
    mesh: Mesh,
) -> None:
    await fund(mesh.ledger, 700, merchant_id=mesh.merchant)
    cut_off = {**mesh.environ, "MERCHANT_SERVICE_ADDR": free_address()}
    async with settlement_service(mesh.services, cut_off) as settlements:
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "DOWNSTREAM_UNAVAILABLE"
    reply = await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=mesh.merchant))
    assert reply.settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED


def _bad(**changes: object) -> settlement_pb2.CreateSettlementRequest:
    request = _settle("s1", 100, merchant_id="m_1")
    for name, value in changes.items():
        if name == "amount_minor":
            request.amount.amount_minor = value  # type: ignore[assignment]  # test table
        elif name == "amount_currency":
            request.amount.currency_code = value  # type: ignore[assignment]  # test table
        else:
            setattr(request, name, value)
    return request


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount_minor": 0}, "amount.amount_minor"),
        ({"amount_minor": -1}, "amount.amount_minor"),
        ({"amount_minor": 10**13}, "amount.amount_minor"),
        ({"amount_currency": "USD"}, "amount.currency_code"),
        ({"currency_code": "XXX"}, "currency_code"),
        ({"request_id": ""}, "request_id"),
        ({"merchant_id": ""}, "merchant_id"),
        ({"bank_account_reference": " "}, "bank_account_reference"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    mesh: Mesh, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.CreateSettlement(_bad(**changes))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_unknown_settlement_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.GetSettlement(
            settlement_pb2.GetSettlementRequest(settlement_id="stl_missing")
        )

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pages_cover_every_settlement_once_newest_first(mesh: Mesh) -> None:
    await fund(mesh.ledger, 500, merchant_id=mesh.merchant)
    created = [
        (
            await mesh.settlements.CreateSettlement(
                _settle(f"s{i}", 100, merchant_id=mesh.merchant)
            )
        ).settlement.settlement_id
        for i in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await mesh.settlements.ListSettlements(
            settlement_pb2.ListSettlementsRequest(
                merchant_id=mesh.merchant, page_size=2, page_token=token
            )
        )
        seen.extend(s.settlement_id for s in page.settlements)
        token = page.next_page_token
        if not token:
            break

    assert seen == created[::-1]


async def test_page_token_of_another_merchant_is_rejected(mesh: Mesh) -> None:
    await fund(mesh.ledger, 200, merchant_id=mesh.merchant)
    for index in range(2):
        await mesh.settlements.CreateSettlement(
            _settle(f"s{index}", 100, merchant_id=mesh.merchant)
        )
    page = await mesh.settlements.ListSettlements(
        settlement_pb2.ListSettlementsRequest(merchant_id=mesh.merchant, page_size=1)
    )

    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.settlements.ListSettlements(
            settlement_pb2.ListSettlementsRequest(
                merchant_id="m_other", page_token=page.next_page_token
            )
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "PAGE_TOKEN_INVALID"


# -- merchants calling with their API key -----------------------------------------------------

#: A well-formed settlement id no settlement has.
MISSING_SETTLEMENT = "stl_000000000000000000000000"


async def test_merchant_reads_its_own_settleable_balance_without_naming_itself(
    mesh: Mesh,
) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    await fund(mesh.ledger, 4_200, merchant_id=tenant.merchant_id)
    async with mesh.as_merchant(tenant.secret) as settlements:
        reply = await settlements.GetSettleableBalance(
            settlement_pb2.GetSettleableBalanceRequest(currency_code=EUR)
        )
    assert (reply.merchant_id, reply.settleable_amount) == (tenant.merchant_id, _money(4_200))


async def test_another_merchants_settleable_balance_is_not_found(mesh: Mesh) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    other = await mesh.directory.onboard("Other Shop")
    await fund(mesh.ledger, 9_000, merchant_id=other.merchant_id)
    async with mesh.as_merchant(tenant.secret) as settlements:
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.GetSettleableBalance(
                settlement_pb2.GetSettleableBalanceRequest(
                    merchant_id=other.merchant_id, currency_code=EUR
                )
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"
    assert str(9_000) not in (caught.value.details() or "")


async def test_another_merchants_settlement_is_not_found_exactly_like_a_missing_one(
    mesh: Mesh,
) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    other = await mesh.directory.onboard("Other Shop")
    await fund(mesh.ledger, 1_000, merchant_id=other.merchant_id)
    theirs = (
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=other.merchant_id))
    ).settlement
    async with mesh.as_merchant(tenant.secret) as settlements:
        with pytest.raises(aio.AioRpcError) as foreign:
            await settlements.GetSettlement(
                settlement_pb2.GetSettlementRequest(settlement_id=theirs.settlement_id)
            )
        with pytest.raises(aio.AioRpcError) as missing:
            await settlements.GetSettlement(
                settlement_pb2.GetSettlementRequest(settlement_id=MISSING_SETTLEMENT)
            )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert refusal(foreign.value, resource_id=theirs.settlement_id) == refusal(
        missing.value, resource_id=MISSING_SETTLEMENT
    )
    async with mesh.as_merchant(other.secret) as settlements:
        own = await settlements.GetSettlement(
            settlement_pb2.GetSettlementRequest(settlement_id=theirs.settlement_id)
        )
    assert own.settlement == theirs


async def test_merchant_lists_only_its_own_settlements(mesh: Mesh) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    other = await mesh.directory.onboard("Other Shop")
    for merchant_id in (tenant.merchant_id, other.merchant_id):
        await fund(mesh.ledger, 500, merchant_id=merchant_id)
    mine = (
        await mesh.settlements.CreateSettlement(_settle("s1", merchant_id=tenant.merchant_id))
    ).settlement
    await mesh.settlements.CreateSettlement(_settle("s2", merchant_id=other.merchant_id))
    async with mesh.as_merchant(tenant.secret) as settlements:
        listed = await settlements.ListSettlements(settlement_pb2.ListSettlementsRequest())
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.ListSettlements(
                settlement_pb2.ListSettlementsRequest(merchant_id=other.merchant_id)
            )
    assert [s.settlement_id for s in listed.settlements] == [mine.settlement_id]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_merchant_call_without_api_key_is_credentials_missing(mesh: Mesh) -> None:
    async with public_channel(mesh.address.public) as channel:
        settlements = settlement_pb2_grpc.SettlementServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.ListSettlements(settlement_pb2.ListSettlementsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "CREDENTIALS_MISSING"


async def test_merchant_call_with_a_bad_api_key_is_unauthenticated(mesh: Mesh) -> None:
    async with mesh.as_merchant("sk_0123456789abcdef_" + "A" * 43) as settlements:
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.GetSettleableBalance(
                settlement_pb2.GetSettleableBalanceRequest(currency_code=EUR)
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "API_KEY_INVALID"


async def test_merchant_key_cannot_create_a_settlement(mesh: Mesh) -> None:
    tenant = await mesh.directory.onboard("Kaffeehaus")
    await fund(mesh.ledger, 1_000, merchant_id=tenant.merchant_id)
    async with mesh.as_merchant(tenant.secret) as settlements:
        with pytest.raises(aio.AioRpcError) as caught:
            await settlements.CreateSettlement(_settle("s1", merchant_id=tenant.merchant_id))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.bank.transfers == {}
