"""settlement-service's data: one row per settlement and the step it has reached.

The row is written in the same transaction that claims the request id; each later step
(posted to the ledger, withdrawal requested, funds returned, merchant notified) is persisted
as it completes, so the recovery loop can finish a settlement that a crash or an outage
interrupted.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paymesh.common.v1 import common_pb2
from paymesh.settlement.v1 import settlement_pb2
from services.storage import idempotency
from services.storage.resumable import Begun, StepStore
from services.storage.sql import Row, timestamp

METHOD = "CreateSettlement"


class Step(enum.StrEnum):
    """The next thing a settlement needs; ``DONE`` once nothing is left."""

    RESERVE = "reserve"
    """Post available -> settling to the ledger (the balance check happens there)."""
    WITHDRAW = "withdraw"
    """Ask withdrawal-service to pay the settling amount out, until it is final."""
    REVERSE = "reverse"
    """The withdrawal failed: post settling -> available to return the funds."""
    NOTIFY = "notify"
    """Terminal status reached; tell the merchant."""
    DONE = "done"
    """Nothing left to do."""


SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS settlements (
    settlement_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    bank_account_reference TEXT NOT NULL,
    status INTEGER NOT NULL,
    step TEXT NOT NULL CHECK (step IN ('reserve', 'withdraw', 'reverse', 'notify', 'done')),
    ledger_transaction_id TEXT NOT NULL DEFAULT '',
    withdrawal_id TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS settlements_by_merchant
    ON settlements (merchant_id, create_time_ns, settlement_id);
"""
    + idempotency.SCHEMA
)


@dataclass(frozen=True, slots=True)
class Record:
    """A settlement as the API shows it, plus the step it has reached."""

    settlement: settlement_pb2.Settlement
    """The settlement message."""
    step: Step
    """What is left to do."""
    request_id: str
    """The request id that created it."""

    @property
    def key(self) -> str:
        """The settlement id."""
        return self.settlement.settlement_id


class SettlementStore(StepStore[Record, settlement_pb2.Settlement]):
    """Settlements in SQLite, idempotent by request id."""

    table = "settlements"
    id_column = "settlement_id"
    method = METHOD
    steps = tuple(Step)

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        super().__init__(path, SCHEMA, clock_ns=clock_ns)

    def begin(
        self,
        request: settlement_pb2.CreateSettlementRequest,
        settlement_id: str,
        amount_minor: int,
        *,
        running: Callable[[str], bool],
    ) -> Begun[Record]:
        """Claim the request id and insert the PENDING settlement in one transaction.

        Args:
            request: the validated request.
            settlement_id: the id derived from the request id.
            amount_minor: the amount to settle (the request's, or the whole balance).
            running: whether this process is still working on a settlement id; an in-flight
                claim whose work is not running was interrupted and is handed back to resume.

        Raises:
            InvalidArgument: the request id was used with a different body.
            Aborted: the first request with this id is still being executed.
        """
        return self._begin(
            request,
            settlement_id,
            running,
            lambda _tx, _now: {
                "merchant_id": request.merchant_id,
                "amount_minor": amount_minor,
                "currency_code": request.currency_code,
                "bank_account_reference": request.bank_account_reference,
                "status": settlement_pb2.SETTLEMENT_STATUS_PENDING,
                "step": Step.RESERVE,
            },
        )

    def advance(
        self,
        record: Record,
        *,
        step: Step,
        status: int | None = None,
        ledger_transaction_id: str | None = None,
        withdrawal_id: str | None = None,
        failure_reason: str | None = None,
    ) -> Record:
        """Persist the next step (and whatever fields it set); returns the updated record."""
        return self._update(
            record,
            step=step,
            status=status,
            ledger_transaction_id=ledger_transaction_id,
            withdrawal_id=withdrawal_id,
            failure_reason=failure_reason,
        )

    def _record(self, row: Row) -> Record:
        settlement = settlement_pb2.Settlement(
            settlement_id=row["settlement_id"],
            merchant_id=row["merchant_id"],
            amount=common_pb2.Money(
                amount_minor=row["amount_minor"], currency_code=row["currency_code"]
            ),
            status=row["status"],
            bank_account_reference=row["bank_account_reference"],
            ledger_transaction_id=row["ledger_transaction_id"],
            withdrawal_id=row["withdrawal_id"],
            failure_reason=row["failure_reason"],
            create_time=timestamp(row["create_time_ns"]),
            update_time=timestamp(row["update_time_ns"]),
        )
        return Record(settlement=settlement, step=Step(row["step"]), request_id=row["request_id"])

    def _message(self, record: Record) -> settlement_pb2.Settlement:
        return record.settlement

    def _response(self, record: Record) -> settlement_pb2.CreateSettlementResponse:
        return settlement_pb2.CreateSettlementResponse(settlement=record.settlement)
