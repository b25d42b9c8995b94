"""accounting-service's data: transactions and their entries; balances are SQL sums of them.

Amounts are INTEGER minor units, so a balance is an exact integer ``SUM``. A transaction, its
entries, its request-id claim and its non-negative check share one write transaction: either
all of it is on disk or none of it is, which keeps concurrent withdrawals from overdrawing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from interceptors.errors import Reason
from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from services.accounting.ledger import CREDIT, DEBIT, content_fingerprint, merchant_account_range
from services.mesh.errors import AlreadyExists, FailedPrecondition, NotFound
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, timestamp

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


def _money(amount_minor: int, currency_code: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency_code=currency_code)


def _entry(row: Row) -> accounting_pb2.LedgerEntry:
    return accounting_pb2.LedgerEntry(
        entry_id=f"ent_{row['seq']}",
        transaction_id=row["transaction_id"],
        account_id=row["account_id"],
        direction=row["direction"],
        amount=_money(row["amount_minor"], row["currency_code"]),
        create_time=timestamp(row["create_time_ns"]),
    )


def _balance(row: Row) -> accounting_pb2.Balance:
    code = row["currency_code"]
    return accounting_pb2.Balance(
        account_id=row["account_id"],
        balance=_money(row["credit_minor"] - row["debit_minor"], code),
        debit_total=_money(row["debit_minor"], code),
        credit_total=_money(row["credit_minor"], code),
        entry_count=row["entry_count"],
        update_time=timestamp(row["latest_ns"]),
    )


class LedgerStore:
    """The double-entry ledger; posting is idempotent by request id and transaction id."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._db = Database(path, SCHEMA, clock_ns=clock_ns)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def post(self, request: accounting_pb2.PostTransactionRequest) -> accounting_pb2.Transaction:
        """Post a checked, balanced transaction, or return it again for a replay.

        Raises:
            AlreadyExists: the transaction id holds a transaction with other content.
            FailedPrecondition: INSUFFICIENT_BALANCE, one of ``non_negative_account_ids``
                would end below zero; nothing is written.
        """
        fingerprint = content_fingerprint(request)

        def run(tx: Statements) -> accounting_pb2.PostTransactionResponse:
            existing = tx.one(
                "SELECT fingerprint FROM transactions WHERE transaction_id = ?",
                (request.transaction_id,),
            )
            if existing is None:
                self._insert(tx, request, fingerprint)
                currencies = sorted({p.amount.currency_code for p in request.postings})
                for account_id in dict.fromkeys(request.non_negative_account_ids):
                    self._require_non_negative(tx, account_id, currencies)
            elif existing["fingerprint"] != fingerprint:
                raise AlreadyExists(
                    f"transaction {request.transaction_id!r} exists with different content",
                    metadata={"transaction_id": request.transaction_id},
                )
            # else: a retry under a new request id; the stored transaction answers it.
            return accounting_pb2.PostTransactionResponse(
                transaction=self._load(tx, request.transaction_id)
            )

        return self._db.idempotent(
            "PostTransaction", request, accounting_pb2.PostTransactionResponse, run
        ).transaction

    def get(self, transaction_id: str) -> accounting_pb2.Transaction:
        """The transaction with its entries; NotFound if there is none."""
        return self._load(self._db, transaction_id)

    def entries(
        self, *, account_id: str, currency_code: str, after_seq: int, limit: int
    ) -> list[tuple[int, accounting_pb2.LedgerEntry]]:
        """An account's entries oldest first after ``after_seq``, each with its sequence number."""
        where: dict[str, object] = {"account_id": account_id}
        if currency_code:
            where["currency_code"] = currency_code
        rows = self._db.page(
            "entries",
            order=("seq",),
            cursor=(after_seq,),
            limit=limit,
            where=where,
            newest_first=False,
        )
        return [(int(row["seq"]), _entry(row)) for row in rows]

    def balance(self, account_id: str, currency_code: str) -> accounting_pb2.Balance:
        """The account's balance in the currency; zero with no entries if it was never used."""
        row = self._db.one(
            _BALANCES.format(where="account_id = ? AND currency_code = ?"),
            (account_id, currency_code),
        )
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
        rows = self._db.all(
            _BALANCES.format(where=where) + " ORDER BY account_id, currency_code LIMIT ?",
            (*params, limit),
        )
        return [_balance(row) for row in rows]

    def _insert(
        self,
        tx: Statements,
        request: accounting_pb2.PostTransactionRequest,
        fingerprint: str,
    ) -> None:
        now = self._db.clock_ns()
        tx.insert(
            "transactions",
            {
                "transaction_id": request.transaction_id,
                "kind": request.kind,
                "reference_id": request.reference_id,
                "description": request.description,
                "fingerprint": fingerprint,
                "create_time_ns": now,
            },
        )
        tx.insert_many(
            "entries",
            [
                {
                    "transaction_id": request.transaction_id,
                    "position": position,
                    "account_id": posting.account_id,
                    "direction": posting.direction,
                    "amount_minor": posting.amount.amount_minor,
                    "currency_code": posting.amount.currency_code,
                    "create_time_ns": now,
                }
                for position, posting in enumerate(request.postings)
            ],
        )

    def _require_non_negative(
        self, tx: Statements, account_id: str, currencies: Sequence[str]
    ) -> None:
        """Raise INSUFFICIENT_BALANCE if the account is below zero in one of ``currencies``.

        Only the transaction's currencies count: the guard says "this posting must not overdraw
        the account", not "the account must be clean in every currency it ever held".
        """
        for currency_code in currencies:
            row = tx.one(
                _BALANCES.format(where="account_id = ? AND currency_code = ?"),
                (account_id, currency_code),
            )
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

    def _load(self, db: Statements, transaction_id: str) -> accounting_pb2.Transaction:
        row = db.one("SELECT * FROM transactions WHERE transaction_id = ?", (transaction_id,))
        if row is None:
            raise NotFound(
                f"transaction {transaction_id!r} does not exist",
                metadata={"transaction_id": transaction_id},
            )
        entries = db.all(
            "SELECT * FROM entries WHERE transaction_id = ? ORDER BY position", (transaction_id,)
        )
        return accounting_pb2.Transaction(
            transaction_id=row["transaction_id"],
            kind=row["kind"],
            reference_id=row["reference_id"],
            description=row["description"],
            entries=[_entry(entry) for entry in entries],
            create_time=timestamp(row["create_time_ns"]),
        )
