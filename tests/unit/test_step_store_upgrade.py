"""Step stores upgrade a table an older version made, and read their recovery interval.

A withdrawals or settlements table whose ``CHECK`` on ``step`` lacks a step of this version is
rebuilt at open with every row kept (indexes included), so work in flight resumes and can
reach the new steps; the recovery loop's interval comes from ``<SERVICE>_RECOVERY_INTERVAL_S``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.mesh.bootstrap import StartupError
from services.settlement.store import SettlementStore
from services.settlement.store import Step as SettlementStep
from services.storage.resumable import DEFAULT_RECOVERY_INTERVAL_S, recovery_interval_s
from services.withdrawal.store import Step, WithdrawalStore

#: The withdrawals table as the version before the ``confirm`` step made it.
OLD_WITHDRAWALS = """
CREATE TABLE withdrawals (
    withdrawal_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    bank_account_reference TEXT NOT NULL,
    settlement_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    step TEXT NOT NULL CHECK (step IN ('reserve', 'transfer', 'reverse', 'notify', 'done')),
    bank_transfer_reference TEXT NOT NULL DEFAULT '',
    ledger_transaction_id TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX one_withdrawal_per_settlement
    ON withdrawals (settlement_id) WHERE settlement_id != '';
CREATE INDEX withdrawals_by_merchant
    ON withdrawals (merchant_id, create_time_ns, withdrawal_id);
INSERT INTO withdrawals VALUES ('wd_1', 'r1', 'm_1', 500, 'EUR', 'DE89', 'stl_1', 1, 'transfer',
    'tr_1', 'txn:wd_1', '', 1, 1);
"""

OLD_SETTLEMENTS = """
CREATE TABLE settlements (
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
INSERT INTO settlements VALUES ('stl_1', 'r1', 'm_1', 500, 'EUR', 'DE89', 1, 'withdraw',
    'txn:stl_1', 'wd_1', '', 1, 1);
"""


def _old(path: Path, script: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(script)
    conn.close()


def test_old_withdrawals_table_is_rebuilt_keeping_its_rows_and_indexes(tmp_path: Path) -> None:
    path = tmp_path / "withdrawal-service.db"
    _old(path, OLD_WITHDRAWALS)

    store = WithdrawalStore(path)
    try:
        [record] = store.unfinished()
        assert (record.key, record.step, record.withdrawal.bank_transfer_reference) == (
            "wd_1",
            Step.TRANSFER,
            "tr_1",
        )
        confirmed = store.advance(record, step=Step.CONFIRM)  # a step the old CHECK refused
        assert confirmed.step == Step.CONFIRM
        with sqlite3.connect(path) as reader:
            indexes = {
                row[0]
                for row in reader.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index'"
                    " AND tbl_name = 'withdrawals'"
                )
            }
        reader.close()
        assert {"one_withdrawal_per_settlement", "withdrawals_by_merchant"} <= indexes
    finally:
        store.close()


def test_old_settlements_table_accepts_the_notify_step(tmp_path: Path) -> None:
    path = tmp_path / "settlement-service.db"
    _old(path, OLD_SETTLEMENTS)

    store = SettlementStore(path)
    try:
        [record] = store.unfinished()
        notified = store.advance(record, step=SettlementStep.NOTIFY)
        assert notified.step == SettlementStep.NOTIFY
    finally:
        store.close()


def test_current_table_is_opened_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "withdrawal-service.db"
    WithdrawalStore(path).close()
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'withdrawals'").fetchone()
    conn.close()
    store = WithdrawalStore(path)
    try:
        assert store.unfinished() == []
        assert store.find("wd_missing") is None
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        after = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'withdrawals'").fetchone()
    conn.close()
    assert before == after


def test_recovery_interval_defaults_to_ten_seconds() -> None:
    assert recovery_interval_s("withdrawal-service", {}) == DEFAULT_RECOVERY_INTERVAL_S == 10.0


def test_recovery_interval_is_read_per_service() -> None:
    environ = {"SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S": "2.5"}
    assert recovery_interval_s("settlement-service", environ) == 2.5
    assert recovery_interval_s("withdrawal-service", environ) == 10.0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_bad_recovery_interval_stops_the_start(value: str) -> None:
    with pytest.raises(StartupError, match="WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S"):
        recovery_interval_s("withdrawal-service", {"WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S": value})
