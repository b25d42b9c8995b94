"""settlement-service's data: one row per settlement and the step it has reached.

The row is written in the same transaction that claims the request id; each later step
(posted to the ledger, withdrawal requested, funds returned) is persisted as it completes,
so a recovery pass can finish a settlement that a crash or an outage interrupted.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Aborted, NotFound
from paymesh.common.v1 import common_pb2
from paymesh.settlement.v1 import settlement_pb2
from services import idempotency
from services.database import open_database, transaction

METHOD = "CreateSettlement"


class Step(enum.StrEnum):
    """The next thing a settlement needs; ``DONE`` once nothing is left."""

    RESERVE = "reserve"
    """Post available -> settling to the ledger (the balance check happens there)."""
    WITHDRAW = "withdraw"
    """Ask withdrawal-service to pay the settling amount out, until it is final."""
    REVERSE = "reverse"
    """The withdrawal failed: post settling -> available to return the funds."""
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
    step TEXT NOT NULL CHECK (step IN ('reserve', 'withdraw', 'reverse', 'done')),
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


@dataclass(frozen=True, slots=True)
class Begun:
    """The outcome of :meth:`SettlementStore.begin`."""

    record: Record
    """The settlement, new or existing."""
    replayed: bool
    """True when the request id had been seen: ``record`` is the earlier settlement."""


def _timestamp(nanos: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def _record(row: sqlite3.Row) -> Record:
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
        create_time=_timestamp(row["create_time_ns"]),
        update_time=_timestamp(row["update_time_ns"]),
    )
    return Record(settlement=settlement, step=Step(row["step"]), request_id=row["request_id"])


class SettlementStore:
    """Settlements in SQLite, idempotent by request id."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock_ns = clock_ns

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def find(self, settlement_id: str) -> Record | None:
        """The settlement, or ``None`` if there is none."""
        row = self._row(settlement_id)
        return None if row is None else _record(row)

    def begin(
        self,
        request: settlement_pb2.CreateSettlementRequest,
        settlement_id: str,
        amount_minor: int,
        *,
        running: Callable[[str], bool],
    ) -> Begun:
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
        with transaction(self._conn) as conn:
            try:
                claim = idempotency.claim(conn, METHOD, request.request_id, request)
            except Aborted:
                existing = self._row(settlement_id)
                if existing is None or running(settlement_id):
                    raise
                return Begun(record=_record(existing), replayed=True)
            if claim.replay is not None:
                return Begun(record=self._require(settlement_id), replayed=True)
            now = self._clock_ns()
            conn.execute(
                "INSERT INTO settlements (settlement_id, request_id, merchant_id, amount_minor,"
                " currency_code, bank_account_reference, status, step, create_time_ns,"
                " update_time_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    settlement_id,
                    request.request_id,
                    request.merchant_id,
                    amount_minor,
                    request.currency_code,
                    request.bank_account_reference,
                    settlement_pb2.SETTLEMENT_STATUS_PENDING,
                    Step.RESERVE,
                    now,
                    now,
                ),
            )
            return Begun(record=self._require(settlement_id), replayed=False)

    def abandon(self, record: Record) -> None:
        """Forget a settlement the ledger refused before any effect, and free its request id."""
        with transaction(self._conn) as conn:
            conn.execute(
                "DELETE FROM settlements WHERE settlement_id = ?",
                (record.settlement.settlement_id,),
            )
            idempotency.release(conn, METHOD, record.request_id)

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
        current = record.settlement
        with transaction(self._conn) as conn:
            conn.execute(
                "UPDATE settlements SET step=?, status=?, ledger_transaction_id=?,"
                " withdrawal_id=?, failure_reason=?, update_time_ns=? WHERE settlement_id=?",
                (
                    step,
                    current.status if status is None else status,
                    _or(ledger_transaction_id, current.ledger_transaction_id),
                    _or(withdrawal_id, current.withdrawal_id),
                    _or(failure_reason, current.failure_reason),
                    self._clock_ns(),
                    current.settlement_id,
                ),
            )
        return self._require(current.settlement_id)

    def settle_claim(self, record: Record) -> None:
        """Mark the request id done, so replays return the settlement instead of ABORTED."""
        with transaction(self._conn) as conn:
            idempotency.complete(
                conn,
                METHOD,
                record.request_id,
                settlement_pb2.CreateSettlementResponse(settlement=record.settlement),
            )

    def get(self, settlement_id: str) -> Record:
        """The settlement; NotFound if there is none."""
        return self._require(settlement_id)

    def unfinished(self) -> list[Record]:
        """Settlements with work left, oldest first (for the recovery pass)."""
        rows = self._conn.execute(
            "SELECT * FROM settlements WHERE step != 'done' ORDER BY create_time_ns, settlement_id"
        ).fetchall()
        return [_record(row) for row in rows]

    def list(
        self, *, merchant_id: str, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[settlement_pb2.Settlement]:
        """A merchant's settlements newest first, before the ``(create_time_ns, id)`` cursor."""
        clauses = ["merchant_id = ?"]
        params: list[object] = [merchant_id]
        if status:
            clauses.append("status = ?")
            params.append(status)
        if before is not None:
            clauses.append("(create_time_ns, settlement_id) < (?, ?)")
            params.extend(before)
        rows = self._conn.execute(
            f"SELECT * FROM settlements WHERE {' AND '.join(clauses)}"
            " ORDER BY create_time_ns DESC, settlement_id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_record(row).settlement for row in rows]

    def _row(self, settlement_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM settlements WHERE settlement_id = ?", (settlement_id,)
        ).fetchone()
        return row

    def _require(self, settlement_id: str) -> Record:
        row = self._row(settlement_id)
        if row is None:
            raise NotFound(
                f"settlement {settlement_id!r} does not exist",
                metadata={"settlement_id": settlement_id},
            )
        return _record(row)


def _or(value: str | None, current: str) -> str:
    return current if value is None else value
