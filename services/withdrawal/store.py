"""withdrawal-service's data: one row per withdrawal and the step it has reached.

The row is written in the same transaction that claims the request id; every later step
(moved to payout_in_transit, paid by the bank, confirmed in the ledger or reversed, notified)
is persisted as it completes, so the recovery loop can finish a withdrawal that a crash or an
outage interrupted.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paymesh.common.v1 import common_pb2
from paymesh.withdrawal.v1 import withdrawal_pb2
from services.mesh.errors import AlreadyExists
from services.storage import idempotency
from services.storage.resumable import Begun, StepStore
from services.storage.sql import Row, Statements, timestamp

METHOD = "CreateWithdrawal"


class Step(enum.StrEnum):
    """The next thing a withdrawal needs; ``DONE`` once nothing is left."""

    RESERVE = "reserve"
    """Post source -> payout_in_transit to the ledger (the balance check happens there)."""
    TRANSFER = "transfer"
    """Ask the bank partner to transfer the money, until it confirms or refuses."""
    CONFIRM = "confirm"
    """The bank confirmed: post payout_in_transit -> platform/bank_payouts."""
    REVERSE = "reverse"
    """The bank refused: post payout_in_transit -> source, returning the funds."""
    NOTIFY = "notify"
    """Terminal status reached; tell the merchant."""
    DONE = "done"
    """Nothing left to do."""


SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS withdrawals (
    withdrawal_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    bank_account_reference TEXT NOT NULL,
    settlement_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    step TEXT NOT NULL
        CHECK (step IN ('reserve', 'transfer', 'confirm', 'reverse', 'notify', 'done')),
    bank_transfer_reference TEXT NOT NULL DEFAULT '',
    ledger_transaction_id TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
-- A settlement is paid out once, whatever request ids its retries carry.
CREATE UNIQUE INDEX IF NOT EXISTS one_withdrawal_per_settlement
    ON withdrawals (settlement_id) WHERE settlement_id != '';
CREATE INDEX IF NOT EXISTS withdrawals_by_merchant
    ON withdrawals (merchant_id, create_time_ns, withdrawal_id);
"""
    + idempotency.SCHEMA
)


@dataclass(frozen=True, slots=True)
class Record:
    """A withdrawal as the API shows it, plus the step it has reached."""

    withdrawal: withdrawal_pb2.Withdrawal
    """The withdrawal message."""
    step: Step
    """What is left to do."""
    request_id: str
    """The request id that created it."""

    @property
    def key(self) -> str:
        """The withdrawal id."""
        return self.withdrawal.withdrawal_id


class WithdrawalStore(StepStore[Record, withdrawal_pb2.Withdrawal]):
    """Withdrawals in SQLite, idempotent by request id and by settlement id."""

    table = "withdrawals"
    id_column = "withdrawal_id"
    method = METHOD
    steps = tuple(Step)

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        super().__init__(path, SCHEMA, clock_ns=clock_ns)

    def begin(
        self,
        request: withdrawal_pb2.CreateWithdrawalRequest,
        withdrawal_id: str,
        *,
        running: Callable[[str], bool],
    ) -> Begun[Record]:
        """Claim the request id and insert the PENDING withdrawal in one transaction.

        Args:
            request: the validated request.
            withdrawal_id: the id derived from the request id.
            running: whether this process is still working on a withdrawal id; an in-flight
                claim whose work is not running was interrupted and is handed back to resume.

        Raises:
            InvalidArgument: the request id was used with a different body.
            Aborted: the first request with this id is still being executed.
            AlreadyExists: the settlement already has a withdrawal of another request.
        """

        def insert(tx: Statements, _now: int) -> dict[str, object]:
            if request.settlement_id:
                other = tx.one(
                    "SELECT withdrawal_id FROM withdrawals WHERE settlement_id = ?",
                    (request.settlement_id,),
                )
                if other is not None:
                    raise AlreadyExists(
                        f"settlement {request.settlement_id!r} is already paid out by "
                        f"withdrawal {other['withdrawal_id']!r}",
                        metadata={
                            "settlement_id": request.settlement_id,
                            "withdrawal_id": other["withdrawal_id"],
                        },
                    )
            return {
                "merchant_id": request.merchant_id,
                "amount_minor": request.amount.amount_minor,
                "currency_code": request.amount.currency_code,
                "bank_account_reference": request.bank_account_reference,
                "settlement_id": request.settlement_id,
                "status": withdrawal_pb2.WITHDRAWAL_STATUS_PENDING,
                "step": Step.RESERVE,
            }

        return self._begin(request, withdrawal_id, running, insert)

    def advance(
        self,
        record: Record,
        *,
        step: Step,
        status: int | None = None,
        bank_transfer_reference: str | None = None,
        ledger_transaction_id: str | None = None,
        failure_reason: str | None = None,
    ) -> Record:
        """Persist the next step (and whatever fields it set); returns the updated record."""
        return self._update(
            record,
            step=step,
            status=status,
            bank_transfer_reference=bank_transfer_reference,
            ledger_transaction_id=ledger_transaction_id,
            failure_reason=failure_reason,
        )

    def _record(self, row: Row) -> Record:
        withdrawal = withdrawal_pb2.Withdrawal(
            withdrawal_id=row["withdrawal_id"],
            merchant_id=row["merchant_id"],
            amount=common_pb2.Money(
                amount_minor=row["amount_minor"], currency_code=row["currency_code"]
            ),
            bank_account_reference=row["bank_account_reference"],
            settlement_id=row["settlement_id"],
            status=row["status"],
            bank_transfer_reference=row["bank_transfer_reference"],
            ledger_transaction_id=row["ledger_transaction_id"],
            failure_reason=row["failure_reason"],
            create_time=timestamp(row["create_time_ns"]),
            update_time=timestamp(row["update_time_ns"]),
        )
        return Record(withdrawal=withdrawal, step=Step(row["step"]), request_id=row["request_id"])

    def _message(self, record: Record) -> withdrawal_pb2.Withdrawal:
        return record.withdrawal

    def _response(self, record: Record) -> withdrawal_pb2.CreateWithdrawalResponse:
        return withdrawal_pb2.CreateWithdrawalResponse(withdrawal=record.withdrawal)
