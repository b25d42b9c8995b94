"""accounting-service's data: transactions and their entries; balances are SQL sums of them.

Amounts are INTEGER minor units, so a balance is an exact integer ``SUM``. A transaction, its
entries, its request-id claim and its non-negative check share one write transaction: either
all of it is on disk or none of it is, which keeps concurrent withdrawals from overdrawing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Reason
from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from services.accounting.ledger import CREDIT, DEBIT, content_fingerprint, merchant_account_range
from services.mesh.errors import AlreadyExists, FailedPrecondition, NotFound
from services.storage import idempotency
from services.storage.database import open_database, transaction

SCHEMA = (
    f"""
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id TEXT PRIMARY KEY,
    kind INTEGER NOT NULL,
    reference_id TEXT NOT NULL,
    description TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    create_time_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL REFERENCES transactions (transaction_id),
    position INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    direction INTEGER NOT NULL CHECK (direction IN ({DEBIT}, {CREDIT})),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    create_time_ns INTEGER NOT NULL,
    UNIQUE (transaction_id, position)
);
CREATE INDEX IF NOT EXISTS entries_by_account ON entries (account_id, seq);
CREATE INDEX IF NOT EXISTS entries_by_account_currency
    ON entries (account_id, currency_code, seq);
"""
    + idempotency.SCHEMA
)

# Sums per (account, currency); the WHERE clause is filled in by each caller.
_BALANCES = f"""
SELECT account_id, currency_code,
       SUM(CASE WHEN direction = {DEBIT} THEN amount_minor ELSE 0 END) AS debit_minor,
       SUM(CASE WHEN direction = {CREDIT} THEN amount_minor ELSE 0 END) AS credit_minor,
       COUNT(*) AS entry_count,
       MAX(create_time_ns) AS latest_ns
FROM entries WHERE {{where}}
GROUP BY account_id, currency_code
"""


def _timestamp(nanoseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    return stamp


def _money(amount_minor: int, currency_code: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency_code=currency_code)


def _entry(row: sqlite3.Row) -> accounting_pb2.LedgerEntry:
    return accounting_pb2.LedgerEntry(
        entry_id=f"ent_{row['seq']}",
        transaction_id=row["transaction_id"],
        account_id=row["account_id"],
        direction=row["direction"],
        amount=_money(row["amount_minor"], row["currency_code"]),
        create_time=_timestamp(row["create_time_ns"]),
    )


def _balance(row: sqlite3.Row) -> accounting_pb2.Balance:
    code = row["currency_code"]
    return accounting_pb2.Balance(
        account_id=row["account_id"],
        balance=_money(row["credit_minor"] - row["debit_minor"], code),
        debit_total=_money(row["debit_minor"], code),
        credit_total=_money(row["credit_minor"], code),
        entry_count=row["entry_count"],
        update_time=_timestamp(row["latest_ns"]),
    )


class LedgerStore:
    """The double-entry ledger in SQLite; posting is idempotent by request id and transaction id."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock_ns = clock_ns

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def post(self, request: accounting_pb2.PostTransactionRequest) -> accounting_pb2.Transaction:
        """Post a checked, balanced transaction, or return it again for a replay.

        Raises:
            AlreadyExists: the transaction id holds a transaction with other content.
            FailedPrecondition: INSUFFICIENT_BALANCE, one of ``non_negative_account_ids``
                would end below zero; nothing is written.
        """
        fingerprint = content_fingerprint(request)
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "PostTransaction", request.request_id, request)
            replay = idempotency.replayed(accounting_pb2.PostTransactionResponse, claim)
            if replay is not None:
                return replay.transaction
            existing = conn.execute(
                "SELECT fingerprint FROM transactions WHERE transaction_id = ?",
                (request.transaction_id,),
            ).fetchone()
            if existing is None:
                self._insert(conn, request, fingerprint)
                currencies = sorted({p.amount.currency_code for p in request.postings})
                for account_id in dict.fromkeys(request.non_negative_account_ids):
                    self._require_non_negative(conn, account_id, currencies)
            elif existing["fingerprint"] != fingerprint:
                raise AlreadyExists(
                    f"transaction {request.transaction_id!r} exists with different content",
                    metadata={"transaction_id": request.transaction_id},
                )
            # else: a retry under a new request id; the stored transaction answers it.
            posted = self._load(request.transaction_id)
            idempotency.complete(
                conn,
                "PostTransaction",
                request.request_id,
                accounting_pb2.PostTransactionResponse(transaction=posted),
            )
            return posted

    def get(self, transaction_id: str) -> accounting_pb2.Transaction:
        """The transaction with its entries; NotFound if there is none."""
        return self._load(transaction_id)

    def entries(
        self, *, account_id: str, currency_code: str, after_seq: int, limit: int
    ) -> list[tuple[int, accounting_pb2.LedgerEntry]]:
        """An account's entries oldest first after ``after_seq``, each with its sequence number."""
        where = "account_id = ? AND seq > ?"
        params: list[object] = [account_id, after_seq]
        if currency_code:
            where += " AND currency_code = ?"
            params.append(currency_code)
        rows = self._conn.execute(
            f"SELECT * FROM entries WHERE {where} ORDER BY seq LIMIT ?", (*params, limit)
        ).fetchall()
        return [(int(row["seq"]), _entry(row)) for row in rows]

    def balance(self, account_id: str, currency_code: str) -> accounting_pb2.Balance:
        """The account's balance in the currency; zero with no entries if it was never used."""
        row = self._conn.execute(
            _BALANCES.format(where="account_id = ? AND currency_code = ?"),
            (account_id, currency_code),
        ).fetchone()
        if row is None:
            zero = _money(0, currency_code)
            return accounting_pb2.Balance(
                account_id=account_id, balance=zero, debit_total=zero, credit_total=zero
            )
        return _balance(row)

    def merchant_balances(
        self, merchant_id: str, *, after: tuple[str, str] | None, limit: int
    ) -> list[accounting_pb2.Balance]:
        """Balances of a merchant's accounts by account id then currency, after the cursor."""
        low, high = merchant_account_range(merchant_id)
        where = "account_id >= ? AND account_id < ?"
        params: list[object] = [low, high]
        if after is not None:
            where += " AND (account_id, currency_code) > (?, ?)"
            params.extend(after)
        rows = self._conn.execute(
            _BALANCES.format(where=where) + " ORDER BY account_id, currency_code LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_balance(row) for row in rows]

    def _insert(
        self,
        conn: sqlite3.Connection,
        request: accounting_pb2.PostTransactionRequest,
        fingerprint: str,
    ) -> None:
        now = self._clock_ns()
        conn.execute(
            "INSERT INTO transactions VALUES (?, ?, ?, ?, ?, ?)",
            (
                request.transaction_id,
                request.kind,
                request.reference_id,
                request.description,
                fingerprint,
                now,
            ),
        )
        conn.executemany(
            "INSERT INTO entries (transaction_id, position, account_id, direction, amount_minor,"
            " currency_code, create_time_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    request.transaction_id,
                    position,
                    posting.account_id,
                    posting.direction,
                    posting.amount.amount_minor,
                    posting.amount.currency_code,
                    now,
                )
                for position, posting in enumerate(request.postings)
            ],
        )

    def _require_non_negative(
        self, conn: sqlite3.Connection, account_id: str, currencies: Sequence[str]
    ) -> None:
        """Raise INSUFFICIENT_BALANCE if the account is below zero in one of ``currencies``.

        Only the transaction's currencies count: the guard says "this posting must not overdraw
        the account", not "the account must be clean in every currency it ever held".
        """
        for currency_code in currencies:
            row = conn.execute(
                _BALANCES.format(where="account_id = ? AND currency_code = ?"),
                (account_id, currency_code),
            ).fetchone()
            balance = 0 if row is None else row["credit_minor"] - row["debit_minor"]
            if balance < 0:
                raise FailedPrecondition(
                    f"account {account_id!r} would end at {balance} {currency_code} minor units;"
                    " it must not go below zero",
                    reason=Reason.INSUFFICIENT_BALANCE,
                    metadata={
                        "account_id": account_id,
                        "currency_code": currency_code,
                        "shortfall_minor": str(-balance),
                    },
                )

    def _load(self, transaction_id: str) -> accounting_pb2.Transaction:
        row = self._conn.execute(
            "SELECT * FROM transactions WHERE transaction_id = ?", (transaction_id,)
        ).fetchone()
        if row is None:
            raise NotFound(
                f"transaction {transaction_id!r} does not exist",
                metadata={"transaction_id": transaction_id},
            )
        entries = self._conn.execute(
            "SELECT * FROM entries WHERE transaction_id = ? ORDER BY position", (transaction_id,)
        ).fetchall()
        return accounting_pb2.Transaction(
            transaction_id=row["transaction_id"],
            kind=row["kind"],
            reference_id=row["reference_id"],
            description=row["description"],
            entries=[_entry(entry) for entry in entries],
            create_time=_timestamp(row["create_time_ns"]),
        )
