"""withdrawal-service RPCs: move to payout_in_transit, pay through the bank, confirm, notify.

CreateWithdrawal first asks merchant-service whether the merchant exists and is active, then
runs as persisted steps (``store.Step``). The ledger moves the amount from the source account
(``available``, or ``settling`` for a settlement) to the merchant's ``payout_in_transit``
with a non-negative check on the source, before the bank call, so concurrent withdrawals can
never exceed the balance; only the bank's confirmation moves it on to
``platform/bank_payouts``, and a bank refusal moves it back (see
``services.accounting.accounts``), so the ledger never shows as paid out what the bank has
not paid. An outage
leaves the withdrawal PENDING for a replay of its request id or the recovery loop to finish,
with the same deterministic ids, so nothing is posted or transferred twice. The merchant is
notified at its webhook (notification-service looks the URL up).

Merchants read their own withdrawals with their API key: an empty merchant_id means their
own, another merchant's id or withdrawal is NOT_FOUND like a missing one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from interceptors.errors import CallError, FailedPreconditionError, Reason
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.accounting import accounts
from services.mesh import validation as v
from services.mesh.active_merchant import require_active_merchant
from services.mesh.authz import merchant_scope
from services.mesh.bootstrap import Context
from services.mesh.clients import PartnerClient
from services.mesh.downstream import is_ambiguous, notify_merchant, reason_of
from services.mesh.errors import FailedPrecondition
from services.storage.resumable import StepDriver, Stepper
from services.withdrawal.store import Record, Step, WithdrawalStore

log = logging.getLogger("paymesh.withdrawal")

#: Platform account the bank's confirmed payouts are credited to.
PAYOUT_ACCOUNT = accounts.BANK_PAYOUTS
#: failure_reason of a withdrawal the bank partner refused (the nearest ErrorReason).
BANK_REFUSED_REASON = Reason.CHANNEL_DECLINED
#: HTTP statuses of the bank that say "not now" rather than "no".
_BANK_NOT_FINAL = frozenset({408, 409, 429})


def withdrawal_id_for(request_id: str) -> str:
    """The withdrawal id of a request id: deterministic, so a re-run reuses every derived id."""
    return "wd_" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def source_account(withdrawal: withdrawal_pb2.Withdrawal) -> str:
    """The account a withdrawal debits: ``settling`` for a settlement, else ``available``."""
    if withdrawal.settlement_id:
        return accounts.settling(withdrawal.merchant_id)
    return accounts.available(withdrawal.merchant_id)


def in_transit_account(withdrawal: withdrawal_pb2.Withdrawal) -> str:
    """The account holding the withdrawal's money between its start and the bank's answer."""
    return accounts.payout_in_transit(withdrawal.merchant_id)


def _require_bank_account(value: str) -> None:
    if not value.strip():
        raise v.invalid("bank_account_reference", "is required")
    v.optional_text("bank_account_reference", value, limit=v.MAX_ID_LENGTH)


class WithdrawalServicer(withdrawal_pb2_grpc.WithdrawalServiceServicer):
    """Creates, reads and lists withdrawals; drives unfinished ones to a final state."""

    def __init__(
        self,
        store: WithdrawalStore,
        *,
        ledger: accounting_pb2_grpc.AccountingServiceAsyncStub,
        notifications: notification_pb2_grpc.NotificationServiceAsyncStub,
        merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
        bank: PartnerClient,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._notifications = notifications
        self._merchants = merchants
        self._bank = bank
        self._driver = StepDriver(store, self._steps, log=log)

    # -- RPCs ---------------------------------------------------------------
    async def CreateWithdrawal(
        self, request: withdrawal_pb2.CreateWithdrawalRequest, context: Context
    ) -> withdrawal_pb2.CreateWithdrawalResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        v.require_amount("amount", request.amount)
        _require_bank_account(request.bank_account_reference)
        if request.settlement_id:
            v.require_id("settlement_id", request.settlement_id)
        withdrawal_id = withdrawal_id_for(request.request_id)
        if self._store.find(withdrawal_id) is None:
            # Before anything is written: a refusal leaves the request id free. Work already
            # begun is finished whatever the merchant's status has become since.
            await require_active_merchant(self._merchants, request.merchant_id, action="paid out")
        begun = self._store.begin(request, withdrawal_id, running=self._driver.running)
        record = begun.record
        if not (begun.replayed and record.step is Step.DONE):
            record = await self._driver.run(record, first=not begun.replayed)
        return withdrawal_pb2.CreateWithdrawalResponse(withdrawal=record.withdrawal)

    async def GetWithdrawal(
        self, request: withdrawal_pb2.GetWithdrawalRequest, context: Context
    ) -> withdrawal_pb2.GetWithdrawalResponse:
        v.require_id("withdrawal_id", request.withdrawal_id)
        # merchant_scope("") is the calling merchant's id, or "" (any merchant) for the mesh.
        record = self._store.get(request.withdrawal_id, merchant_id=merchant_scope(""))
        return withdrawal_pb2.GetWithdrawalResponse(withdrawal=record.withdrawal)

    async def ListWithdrawals(
        self, request: withdrawal_pb2.ListWithdrawalsRequest, context: Context
    ) -> withdrawal_pb2.ListWithdrawalsResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        if request.status not in withdrawal_pb2.WithdrawalStatus.values():
            raise v.invalid("status", f"{request.status} is not a WithdrawalStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": merchant_id, "status": request.status}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        withdrawals, next_token = v.page_of(
            self._store.list(
                merchant_id=merchant_id,
                status=request.status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.withdrawal_id},
        )
        return withdrawal_pb2.ListWithdrawalsResponse(
            withdrawals=withdrawals, next_page_token=next_token
        )

    # -- recovery and shutdown -----------------------------------------------
    def start_recovery(self, interval_s: float) -> None:
        """Drive every unfinished withdrawal now and then every ``interval_s``, until close."""
        self._driver.start_recovery(interval_s)

    async def close(self) -> None:
        """Stop the recovery pass and the work in flight; their rows stay resumable."""
        await self._driver.close()

    # -- the steps --------------------------------------------------------------
    def _steps(self, first: bool) -> Mapping[Step, Stepper[Record]]:
        """The step functions; only a new request's first refusal leaves no trace."""

        async def reserve(current: Record) -> Record:
            return await self._reserve(current, first=first)

        return {
            Step.RESERVE: reserve,
            Step.TRANSFER: self._transfer,
            Step.CONFIRM: self._confirm,
            Step.REVERSE: self._reverse,
            Step.NOTIFY: self._notify,
        }

    async def _reserve(self, record: Record, *, first: bool) -> Record:
        """Move the amount from its source to payout_in_transit; the ledger refuses an overdraft."""
        withdrawal = record.withdrawal
        source = source_account(withdrawal)
        transaction_id = f"txn:{withdrawal.withdrawal_id}"
        try:
            await self._ledger.PostTransaction(
                _transaction(
                    request_id=f"{withdrawal.withdrawal_id}:reserve",
                    transaction_id=transaction_id,
                    kind=accounting_pb2.TRANSACTION_KIND_WITHDRAWAL,
                    withdrawal=withdrawal,
                    debit=source,
                    credit=in_transit_account(withdrawal),
                    non_negative=source,
                )
            )
        except CallError as exc:
            if is_ambiguous(exc):
                log.warning("reservation of %s not confirmed: %s", withdrawal.withdrawal_id, exc)
                return record
            if first:
                # Nothing happened anywhere: the request leaves no trace and may be retried.
                self._store.abandon(record)
                if isinstance(exc, FailedPreconditionError):
                    raise FailedPrecondition(
                        f"{source} cannot pay out {withdrawal.amount.amount_minor} "
                        f"{withdrawal.amount.currency_code}: {exc.details()}",
                        reason=reason_of(exc),
                        metadata={"account_id": source},
                    ) from exc
                raise
            return self._store.advance(
                record,
                step=Step.NOTIFY,
                status=withdrawal_pb2.WITHDRAWAL_STATUS_FAILED,
                failure_reason=reason_of(exc),
            )
        return self._store.advance(record, step=Step.TRANSFER, ledger_transaction_id=transaction_id)

    async def _transfer(self, record: Record) -> Record:
        """Ask the bank to pay; the withdrawal id is the idempotency key of every attempt."""
        withdrawal = record.withdrawal
        try:
            reply = await self._bank.request(
                "POST",
                "/transfers",
                json={
                    "amount_minor": withdrawal.amount.amount_minor,
                    "currency": withdrawal.amount.currency_code,
                    "account": withdrawal.bank_account_reference,
                    "reference": withdrawal.withdrawal_id,
                },
                idempotency_key=withdrawal.withdrawal_id,
            )
        except CallError as exc:  # a PartnerCallError: the chain gave up
            log.warning("bank transfer of %s not confirmed: %s", withdrawal.withdrawal_id, exc)
            return record
        body = reply.body if isinstance(reply.body, dict) else {}
        reference = str(body.get("id", ""))
        if 200 <= reply.status < 300 and body.get("status") == "completed":
            return self._store.advance(record, step=Step.CONFIRM, bank_transfer_reference=reference)
        refused = 400 <= reply.status < 500 and reply.status not in _BANK_NOT_FINAL
        if refused or body.get("status") in ("failed", "rejected", "returned"):
            log.info(
                "bank refused withdrawal %s (HTTP %d): %s",
                withdrawal.withdrawal_id,
                reply.status,
                body.get("error", body.get("status", "")),
            )
            return self._store.advance(
                record,
                step=Step.REVERSE,
                failure_reason=BANK_REFUSED_REASON,
                bank_transfer_reference=reference,
            )
        # Accepted but not final yet: asking again with the same key returns its new state.
        return self._store.advance(record, step=Step.TRANSFER, bank_transfer_reference=reference)

    async def _confirm(self, record: Record) -> Record:
        """Record the bank's confirmation: payout_in_transit -> platform/bank_payouts."""
        withdrawal = record.withdrawal
        try:
            await self._ledger.PostTransaction(
                _transaction(
                    request_id=f"{withdrawal.withdrawal_id}:paid",
                    transaction_id=f"txn:{withdrawal.withdrawal_id}:paid",
                    kind=accounting_pb2.TRANSACTION_KIND_WITHDRAWAL,
                    withdrawal=withdrawal,
                    debit=in_transit_account(withdrawal),
                    credit=PAYOUT_ACCOUNT,
                )
            )
        except CallError as exc:
            # The bank paid: the ledger must say so, so this step is retried whatever it said.
            log.error("payout of %s not posted, will retry: %s", withdrawal.withdrawal_id, exc)
            return record
        return self._store.advance(
            record, step=Step.NOTIFY, status=withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
        )

    async def _reverse(self, record: Record) -> Record:
        """Return the amount in transit to the account it came from after the bank refused."""
        withdrawal = record.withdrawal
        source = source_account(withdrawal)
        try:
            await self._ledger.PostTransaction(
                _transaction(
                    request_id=f"{withdrawal.withdrawal_id}:reversal",
                    transaction_id=f"txn:{withdrawal.withdrawal_id}:reversal",
                    kind=accounting_pb2.TRANSACTION_KIND_REVERSAL,
                    withdrawal=withdrawal,
                    debit=in_transit_account(withdrawal),
                    credit=source,
                )
            )
        except CallError as exc:
            log.error("reversal of %s not posted, will retry: %s", withdrawal.withdrawal_id, exc)
            return record
        return self._store.advance(
            record, step=Step.NOTIFY, status=withdrawal_pb2.WITHDRAWAL_STATUS_FAILED
        )

    async def _notify(self, record: Record) -> Record:
        """Tell the merchant at its webhook (notification-service finds the URL and retries
        delivery); only an outage keeps the step for a retry."""
        withdrawal = record.withdrawal
        completed = withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
        payload = {
            "withdrawal_id": withdrawal.withdrawal_id,
            "settlement_id": withdrawal.settlement_id,
            "amount_minor": withdrawal.amount.amount_minor,
            "currency_code": withdrawal.amount.currency_code,
            "status": withdrawal_pb2.WithdrawalStatus.Name(withdrawal.status),
            "bank_transfer_reference": withdrawal.bank_transfer_reference,
            "failure_reason": withdrawal.failure_reason,
        }
        sent = await notify_merchant(
            self._notifications,
            subject_id=withdrawal.withdrawal_id,
            merchant_id=withdrawal.merchant_id,
            event_type="withdrawal.completed" if completed else "withdrawal.failed",
            payload=payload,
            log=log,
        )
        return self._store.advance(record, step=Step.DONE) if sent else record


def _transaction(
    *,
    request_id: str,
    transaction_id: str,
    kind: accounting_pb2.TransactionKind.ValueType,
    withdrawal: withdrawal_pb2.Withdrawal,
    debit: str,
    credit: str,
    non_negative: str | None = None,
) -> accounting_pb2.PostTransactionRequest:
    """A two-legged ledger transaction moving the withdrawal's amount from debit to credit."""
    return accounting_pb2.PostTransactionRequest(
        request_id=request_id,
        transaction_id=transaction_id,
        kind=kind,
        reference_id=withdrawal.withdrawal_id,
        description=f"withdrawal {withdrawal.withdrawal_id}",
        postings=[
            accounting_pb2.Posting(
                account_id=debit,
                direction=accounting_pb2.ENTRY_DIRECTION_DEBIT,
                amount=withdrawal.amount,
            ),
            accounting_pb2.Posting(
                account_id=credit,
                direction=accounting_pb2.ENTRY_DIRECTION_CREDIT,
                amount=withdrawal.amount,
            ),
        ],
        non_negative_account_ids=[non_negative] if non_negative else [],
    )
