"""settlement-service RPCs: settleable balance, and settlements paid out by withdrawal-service.

CreateSettlement first asks merchant-service whether the merchant exists and is active, then
runs as persisted steps (``store.Step``): the ledger moves the amount from ``available`` to
``settling`` (refusing an overdraft atomically, which keeps concurrent settlements honest),
then withdrawal-service pays it out (settling -> payout_in_transit -> platform/bank_payouts
once the bank confirmed, see ``services.accounting.accounts``); a failed withdrawal returns
the funds to ``available``; the merchant is told at its webhook either way. An outage leaves
the settlement PENDING for a replay of its request id or the recovery loop to finish with the
same deterministic ids.

Merchants read their own balance and settlements with their API key: an empty merchant_id
means their own, another merchant's id or settlement is NOT_FOUND like a missing one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import CallError, FailedPreconditionError, Reason
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.accounting import accounts
from services.mesh import validation as v
from services.mesh.active_merchant import require_active_merchant
from services.mesh.authz import current_merchant, merchant_scope
from services.mesh.bootstrap import Context
from services.mesh.downstream import is_ambiguous, notify_merchant, reason_of
from services.mesh.errors import FailedPrecondition
from services.settlement.store import Record, SettlementStore, Step
from services.storage.resumable import StepDriver, Stepper

log = logging.getLogger("paymesh.settlement")


def settlement_id_for(request_id: str) -> str:
    """The settlement id of a request id: deterministic, so a re-run reuses every derived id."""
    return "stl_" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def available_account(merchant_id: str) -> str:
    """The merchant's ledger account of earned, not yet settled money."""
    return accounts.available(merchant_id)


def settling_account(merchant_id: str) -> str:
    """The merchant's ledger account of money in settlement, not yet handed to the bank."""
    return accounts.settling(merchant_id)


def _require_bank_account(value: str) -> None:
    if not value.strip():
        raise v.invalid("bank_account_reference", "is required")
    v.optional_text("bank_account_reference", value, limit=v.MAX_ID_LENGTH)


class SettlementServicer(settlement_pb2_grpc.SettlementServiceServicer):
    """Reports settleable balances, creates, reads and lists settlements."""

    def __init__(
        self,
        store: SettlementStore,
        *,
        ledger: accounting_pb2_grpc.AccountingServiceAsyncStub,
        withdrawals: withdrawal_pb2_grpc.WithdrawalServiceAsyncStub,
        merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
        notifications: notification_pb2_grpc.NotificationServiceAsyncStub,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._withdrawals = withdrawals
        self._merchants = merchants
        self._notifications = notifications
        self._driver = StepDriver(store, self._steps, log=log)

    # -- RPCs ---------------------------------------------------------------
    async def GetSettleableBalance(
        self, request: settlement_pb2.GetSettleableBalanceRequest, context: Context
    ) -> settlement_pb2.GetSettleableBalanceResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        v.require_currency("currency_code", request.currency_code)
        if current_merchant() is None:
            # A mesh caller may name any id; a merchant's API key already proved it exists.
            await self._require_merchant(merchant_id, active=False)
        amount = await self._settleable(merchant_id, request.currency_code)
        as_of = Timestamp()
        as_of.GetCurrentTime()
        return settlement_pb2.GetSettleableBalanceResponse(
            merchant_id=merchant_id,
            settleable_amount=common_pb2.Money(
                amount_minor=amount, currency_code=request.currency_code
            ),
            as_of_time=as_of,
        )

    async def CreateSettlement(
        self, request: settlement_pb2.CreateSettlementRequest, context: Context
    ) -> settlement_pb2.CreateSettlementResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        v.require_currency("currency_code", request.currency_code)
        amount: int | None = None
        if request.HasField("amount"):
            amount = v.require_amount("amount", request.amount)
            if request.amount.currency_code != request.currency_code:
                raise v.invalid(
                    "amount.currency_code",
                    f"must equal currency_code {request.currency_code!r}",
                    reason=Reason.CURRENCY_UNSUPPORTED,
                )
        _require_bank_account(request.bank_account_reference)
        settlement_id = settlement_id_for(request.request_id)
        existing = self._store.find(settlement_id)
        if existing is None:
            # Before anything is written: a refusal leaves the request id free. Work already
            # begun is finished whatever the merchant's status has become since.
            await self._require_merchant(request.merchant_id, active=True)
        if amount is None:
            if existing is not None:  # a replay: begin() checks the body and returns it
                amount = existing.settlement.amount.amount_minor
            else:
                amount = await self._whole_balance(request.merchant_id, request.currency_code)
        begun = self._store.begin(request, settlement_id, amount, running=self._driver.running)
        record = begun.record
        if not (begun.replayed and record.step is Step.DONE):
            record = await self._driver.run(record, first=not begun.replayed)
        return settlement_pb2.CreateSettlementResponse(settlement=record.settlement)

    async def GetSettlement(
        self, request: settlement_pb2.GetSettlementRequest, context: Context
    ) -> settlement_pb2.GetSettlementResponse:
        v.require_id("settlement_id", request.settlement_id)
        # merchant_scope("") is the calling merchant's id, or "" (any merchant) for the mesh.
        record = self._store.get(request.settlement_id, merchant_id=merchant_scope(""))
        return settlement_pb2.GetSettlementResponse(settlement=record.settlement)

    async def ListSettlements(
        self, request: settlement_pb2.ListSettlementsRequest, context: Context
    ) -> settlement_pb2.ListSettlementsResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        if request.status not in settlement_pb2.SettlementStatus.values():
            raise v.invalid("status", f"{request.status} is not a SettlementStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": merchant_id, "status": request.status}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        settlements, next_token = v.page_of(
            self._store.list(
                merchant_id=merchant_id,
                status=request.status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.settlement_id},
        )
        return settlement_pb2.ListSettlementsResponse(
            settlements=settlements, next_page_token=next_token
        )

    # -- recovery and shutdown -----------------------------------------------
    def start_recovery(self, interval_s: float) -> None:
        """Drive every unfinished settlement now and then every ``interval_s``, until close."""
        self._driver.start_recovery(interval_s)

    async def close(self) -> None:
        """Stop the recovery pass and the work in flight; their rows stay resumable."""
        await self._driver.close()

    # -- the steps --------------------------------------------------------------
    async def _require_merchant(self, merchant_id: str, *, active: bool) -> None:
        """NOT_FOUND for an unknown merchant; with ``active``, MERCHANT_INACTIVE if suspended."""
        try:
            await require_active_merchant(self._merchants, merchant_id, action="settled")
        except FailedPrecondition:
            if active:
                raise

    async def _settleable(self, merchant_id: str, currency_code: str) -> int:
        reply = await self._ledger.GetBalance(
            accounting_pb2.GetBalanceRequest(
                account_id=available_account(merchant_id), currency_code=currency_code
            )
        )
        return max(reply.balance.balance.amount_minor, 0)

    async def _whole_balance(self, merchant_id: str, currency_code: str) -> int:
        """The amount of a settlement that names none: all of it, within one payout's limit."""
        amount = await self._settleable(merchant_id, currency_code)
        if amount <= 0:
            raise FailedPrecondition(
                f"{available_account(merchant_id)} holds no {currency_code} to settle",
                reason=Reason.INSUFFICIENT_BALANCE,
                metadata={"account_id": available_account(merchant_id)},
            )
        # A larger balance is settled over several settlements (a payout has a maximum).
        return min(amount, v.MAX_AMOUNT_MINOR)

    def _steps(self, first: bool) -> Mapping[Step, Stepper[Record]]:
        """The step functions; only a new request's first refusal leaves no trace."""

        async def reserve(current: Record) -> Record:
            return await self._reserve(current, first=first)

        return {
            Step.RESERVE: reserve,
            Step.WITHDRAW: self._withdraw,
            Step.REVERSE: self._reverse,
            Step.NOTIFY: self._notify,
        }

    async def _reserve(self, record: Record, *, first: bool) -> Record:
        """Move the amount from available to settling; the ledger refuses an overdraft."""
        settlement = record.settlement
        available = available_account(settlement.merchant_id)
        transaction_id = f"txn:{settlement.settlement_id}"
        try:
            await self._ledger.PostTransaction(
                _transaction(
                    request_id=f"{settlement.settlement_id}:settle",
                    transaction_id=transaction_id,
                    kind=accounting_pb2.TRANSACTION_KIND_SETTLEMENT,
                    settlement=settlement,
                    debit=available,
                    credit=settling_account(settlement.merchant_id),
                )
            )
        except CallError as exc:
            if is_ambiguous(exc):
                log.warning("settlement %s not posted yet: %s", settlement.settlement_id, exc)
                return record
            if first:
                # Nothing happened anywhere: the request leaves no trace and may be retried.
                self._store.abandon(record)
                if isinstance(exc, FailedPreconditionError):
                    raise FailedPrecondition(
                        f"{available} cannot settle {settlement.amount.amount_minor} "
                        f"{settlement.amount.currency_code}: {exc.details()}",
                        reason=reason_of(exc),
                        metadata={"account_id": available},
                    ) from exc
                raise
            return self._store.advance(
                record,
                step=Step.NOTIFY,
                status=settlement_pb2.SETTLEMENT_STATUS_FAILED,
                failure_reason=reason_of(exc),
            )
        return self._store.advance(record, step=Step.WITHDRAW, ledger_transaction_id=transaction_id)

    async def _withdraw(self, record: Record) -> Record:
        """Have withdrawal-service pay the settlement out (idempotent by the derived request id)."""
        settlement = record.settlement
        try:
            reply = await self._withdrawals.CreateWithdrawal(
                withdrawal_pb2.CreateWithdrawalRequest(
                    request_id=f"{settlement.settlement_id}:withdrawal",
                    merchant_id=settlement.merchant_id,
                    amount=settlement.amount,
                    bank_account_reference=settlement.bank_account_reference,
                    settlement_id=settlement.settlement_id,
                )
            )
        except CallError as exc:
            if is_ambiguous(exc):
                log.warning("withdrawal of %s not confirmed: %s", settlement.settlement_id, exc)
                return record
            log.warning("withdrawal of %s refused: %s", settlement.settlement_id, exc)
            return self._store.advance(record, step=Step.REVERSE, failure_reason=reason_of(exc))
        withdrawal = reply.withdrawal
        if withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED:
            return self._store.advance(
                record,
                step=Step.NOTIFY,
                status=settlement_pb2.SETTLEMENT_STATUS_COMPLETED,
                withdrawal_id=withdrawal.withdrawal_id,
            )
        if withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_FAILED:
            return self._store.advance(
                record,
                step=Step.REVERSE,
                withdrawal_id=withdrawal.withdrawal_id,
                failure_reason=withdrawal.failure_reason or Reason.INTERNAL_ERROR,
            )
        # Still pending there: asking again with the same request id resumes it.
        return self._store.advance(
            record, step=Step.WITHDRAW, withdrawal_id=withdrawal.withdrawal_id
        )

    async def _reverse(self, record: Record) -> Record:
        """Return the funds from settling to available after the withdrawal failed."""
        settlement = record.settlement
        settling = settling_account(settlement.merchant_id)
        try:
            await self._ledger.PostTransaction(
                _transaction(
                    request_id=f"{settlement.settlement_id}:reversal",
                    transaction_id=f"txn:{settlement.settlement_id}:reversal",
                    kind=accounting_pb2.TRANSACTION_KIND_REVERSAL,
                    settlement=settlement,
                    debit=settling,
                    credit=available_account(settlement.merchant_id),
                )
            )
        except CallError as exc:
            log.error("reversal of %s not posted, will retry: %s", settlement.settlement_id, exc)
            return record
        return self._store.advance(
            record, step=Step.NOTIFY, status=settlement_pb2.SETTLEMENT_STATUS_FAILED
        )

    async def _notify(self, record: Record) -> Record:
        """Tell the merchant at its webhook (notification-service finds the URL and retries
        delivery); only an outage keeps the step for a retry."""
        settlement = record.settlement
        completed = settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED
        payload = {
            "settlement_id": settlement.settlement_id,
            "withdrawal_id": settlement.withdrawal_id,
            "amount_minor": settlement.amount.amount_minor,
            "currency_code": settlement.amount.currency_code,
            "status": settlement_pb2.SettlementStatus.Name(settlement.status),
            "failure_reason": settlement.failure_reason,
        }
        sent = await notify_merchant(
            self._notifications,
            subject_id=settlement.settlement_id,
            merchant_id=settlement.merchant_id,
            event_type="settlement.completed" if completed else "settlement.failed",
            payload=payload,
            log=log,
        )
        return self._store.advance(record, step=Step.DONE) if sent else record


def _transaction(
    *,
    request_id: str,
    transaction_id: str,
    kind: accounting_pb2.TransactionKind.ValueType,
    settlement: settlement_pb2.Settlement,
    debit: str,
    credit: str,
) -> accounting_pb2.PostTransactionRequest:
    """Move the settlement's amount from ``debit`` (which must stay non-negative) to ``credit``."""
    return accounting_pb2.PostTransactionRequest(
        request_id=request_id,
        transaction_id=transaction_id,
        kind=kind,
        reference_id=settlement.settlement_id,
        description=f"settlement {settlement.settlement_id}",
        postings=[
            accounting_pb2.Posting(
                account_id=debit,
                direction=accounting_pb2.ENTRY_DIRECTION_DEBIT,
                amount=settlement.amount,
            ),
            accounting_pb2.Posting(
                account_id=credit,
                direction=accounting_pb2.ENTRY_DIRECTION_CREDIT,
                amount=settlement.amount,
            ),
        ],
        non_negative_account_ids=[debit],
    )
