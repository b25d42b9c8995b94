"""The store base on both engines: migrations, and exactly-once when two replicas race.

Each "replica" is its own :class:`Database` (its own connection) on one database, driven
from its own thread; a barrier starts them together. On PostgreSQL that is what two
processes on two machines do; on SQLite, two processes on one file.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from paymesh.settlement.v1 import settlement_pb2
from services.accounting.ledger import CREDIT, DEBIT
from services.accounting.store import LedgerStore
from services.mesh.bootstrap import SHARED_DATABASE_VAR, StartupError, database_target
from services.mesh.diagnostics import Health, check_database
from services.mesh.errors import Aborted, FailedPrecondition, ServiceError
from services.mesh.topology import SERVICES
from services.settlement.store import SettlementStore
from services.storage import engines, idempotency, sql
from services.storage.sql import (
    Database,
    DatabaseError,
    Statements,
    StoreError,
    Target,
    target_of_url,
)
from services.tools.migrate import migrate_all
from services.tools.ports import free_port
from services.tools.postgres import LocalCluster

ITEMS = """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    payload BLOB,
    seq_ns INTEGER NOT NULL DEFAULT 0
);
"""
NOTE = "ALTER TABLE items ADD COLUMN note TEXT NOT NULL DEFAULT ''"
ResultT = TypeVar("ResultT")


def _race(*work: Callable[[], ResultT]) -> list[ResultT | ServiceError]:
    """Run each piece of work in its own thread, started together; each result or error."""
    barrier = threading.Barrier(len(work))
    results: list[ResultT | ServiceError | None] = [None] * len(work)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work[index]()
        except ServiceError as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return [result for result in results if result is not None]


@pytest.fixture
def replicas(database_target: Callable[[str], Target]) -> Iterator[list[Database]]:
    """Two replicas' connections to one fresh database holding ``items``."""
    target = database_target("items")
    opened = [Database(target, ITEMS), Database(target, ITEMS)]
    yield opened
    for db in opened:
        db.close()


def _migrations(db: Database) -> list[tuple[str, int]]:
    rows = db.all("SELECT component, version FROM schema_migrations ORDER BY component, version")
    return [(str(row["component"]), int(row["version"])) for row in rows]


def test_a_new_database_gets_the_base_tables_then_the_stores_migrations(
    database_target: Callable[[str], Target],
) -> None:
    db = Database(database_target("items"), ITEMS)
    try:
        assert db.applied == [*(f"{name} 1" for name in sql.BASE_TABLES), "items 1"]
        assert _migrations(db) == sorted([*((name, 1) for name in sql.BASE_TABLES), ("items", 1)])
    finally:
        db.close()


def test_reopening_applies_nothing_and_an_appended_migration_applies_alone(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("items")
    Database(target, ITEMS).close()
    again = Database(target, ITEMS)
    assert again.applied == []
    again.close()
    newer = Database(target, [ITEMS, NOTE])
    try:
        assert newer.applied == ["items 2"]
        assert "note" in newer.columns("items")
    finally:
        newer.close()


def test_an_applied_migration_changed_beyond_creating_what_is_missing_is_refused(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("items")
    Database(target, [ITEMS, NOTE]).close()
    with pytest.raises(StoreError, match="migration 2 of items changed"):
        Database(target, [ITEMS, NOTE.replace("note", "remark")])


def test_an_applied_migration_that_gained_a_table_creates_it(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("items")
    Database(target, ITEMS).close()
    grown = ITEMS + "CREATE TABLE IF NOT EXISTS tags (tag TEXT PRIMARY KEY);"
    db = Database(target, grown)
    try:
        assert db.applied == ["items 1"]
        assert db.columns("tags") == ["tag"]
    finally:
        db.close()


def test_two_replicas_opening_at_once_migrate_once(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("items")
    opened = _race(lambda: Database(target, ITEMS), lambda: Database(target, ITEMS))
    dbs = [db for db in opened if isinstance(db, Database)]
    try:
        assert len(dbs) == 2
        assert sorted(len(db.applied) for db in dbs) == [0, len(sql.BASE_TABLES) + 1]
        assert len(_migrations(dbs[0])) == len(sql.BASE_TABLES) + 1
    finally:
        for db in dbs:
            db.close()


def test_integers_are_64_bits_and_blobs_are_bytes(replicas: list[Database]) -> None:
    db = replicas[0]
    nanos = 1_700_000_000_123_456_789
    with db.transaction() as tx:
        tx.insert(
            "items", {"item_id": "i_1", "label": "x", "payload": b"\x00\xff", "seq_ns": nanos}
        )
    row = db.one("SELECT payload, seq_ns FROM items WHERE item_id = ?", ("i_1",))
    assert row is not None
    assert (bytes(row["payload"]), row["seq_ns"]) == (b"\x00\xff", nanos)
    total = db.aggregate("SELECT SUM(seq_ns) AS total FROM items")["total"]
    assert total == nanos and isinstance(total, int)


def test_two_replicas_racing_one_request_id_run_it_once(replicas: list[Database]) -> None:
    runs: list[str] = []
    request = order_pb2.UpdateOrderStatusRequest(request_id="r_1", order_id="o_1")

    def claim(db: Database) -> Callable[[], order_pb2.UpdateOrderStatusResponse]:
        def run(tx: Statements) -> order_pb2.UpdateOrderStatusResponse:
            runs.append("ran")
            time.sleep(0.05)  # hold the transaction open: the other replica is waiting on it
            tx.insert("items", {"item_id": f"i_{len(runs)}", "label": "x"})
            return order_pb2.UpdateOrderStatusResponse(order=order_pb2.Order(order_id="o_1"))

        return lambda: db.idempotent("Test", request, order_pb2.UpdateOrderStatusResponse, run)

    results = _race(*(claim(db) for db in replicas))
    assert runs == ["ran"]
    assert results[0] == results[1]  # the loser replays the winner's response
    assert replicas[0].aggregate("SELECT COUNT(*) AS n FROM items")["n"] == 1


def test_a_failing_item_of_a_batch_rolls_back_its_own_writes_only(
    replicas: list[Database],
) -> None:
    db = replicas[0]

    def run(tx: Statements, request: order_pb2.UpdateOrderStatusRequest) -> Any:
        tx.insert("items", {"item_id": request.order_id, "label": request.reason})
        if request.reason == "bad":  # after its write: the savepoint must undo it
            raise FailedPrecondition("refused")
        return order_pb2.UpdateOrderStatusResponse(order=order_pb2.Order(order_id=request.order_id))

    def item(request_id: str, order_id: str, reason: str = "ok") -> Any:
        return order_pb2.UpdateOrderStatusRequest(
            request_id=request_id, order_id=order_id, reason=reason
        )

    batch = [item("r_1", "i_1"), item("r_2", "i_2", "bad"), item("r_1", "i_1"), item("r_3", "i_3")]
    outcomes = db.idempotent_each("Test", batch, order_pb2.UpdateOrderStatusResponse, run)
    assert [(o.duplicate, type(o.error).__name__) for o in outcomes] == [
        (False, "NoneType"),
        (False, "FailedPrecondition"),
        (True, "NoneType"),
        (False, "NoneType"),
    ]
    labels = replicas[1].all("SELECT item_id FROM items ORDER BY item_id")
    assert [row["item_id"] for row in labels] == ["i_1", "i_3"]
    # The refused item's request id stayed free: it runs anew.
    retried = [item("r_2", "i_2")]
    again = db.idempotent_each("Test", retried, order_pb2.UpdateOrderStatusResponse, run)
    assert again[0].error is None and not again[0].duplicate


def _posting(account_id: str, direction: int, amount_minor: int) -> accounting_pb2.Posting:
    return accounting_pb2.Posting(
        account_id=account_id,
        direction=direction,  # type: ignore[arg-type]  # DEBIT/CREDIT are the enum's values
        amount=common_pb2.Money(amount_minor=amount_minor, currency_code="EUR"),
    )


def _post(
    request_id: str, postings: Sequence[accounting_pb2.Posting], *, guarded: Sequence[str] = ()
) -> accounting_pb2.PostTransactionRequest:
    return accounting_pb2.PostTransactionRequest(
        request_id=request_id,
        transaction_id=f"txn_{request_id}",
        reference_id=request_id,
        postings=postings,
        non_negative_account_ids=guarded,
    )


def test_two_replicas_racing_withdrawals_never_overdraw_the_account(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("accounting")
    ledgers = [LedgerStore(target), LedgerStore(target)]
    try:
        ledgers[0].post(
            _post("r_fund", [_posting("merchant", CREDIT, 100), _posting("world", DEBIT, 100)])
        )
        withdrawals = [
            _post(
                f"r_out_{i}",
                [_posting("merchant", DEBIT, 80), _posting("bank", CREDIT, 80)],
                guarded=["merchant"],
            )
            for i in range(2)
        ]
        results = _race(
            lambda: ledgers[0].post(withdrawals[0]), lambda: ledgers[1].post(withdrawals[1])
        )
        refused = [r for r in results if isinstance(r, FailedPrecondition)]
        assert len(refused) == 1, results
        balance = ledgers[1].balance("merchant", "EUR").balance.amount_minor
        assert balance == 20
    finally:
        for ledger in ledgers:
            ledger.close()


def test_two_replicas_beginning_one_settlement_make_one_row(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("settlement")
    stores = [SettlementStore(target), SettlementStore(target)]
    request = settlement_pb2.CreateSettlementRequest(
        request_id="r_settle", merchant_id="m_1", currency_code="EUR", bank_account_reference="DE"
    )
    try:
        results = _race(
            *(
                lambda store=store: store.begin(request, "stl_1", 100, running=lambda _: True)
                for store in stores
            )
        )
        begun = [r for r in results if not isinstance(r, ServiceError)]
        assert len(begun) == 1 and not begun[0].replayed, results
        assert [type(r) for r in results if isinstance(r, ServiceError)] == [Aborted]
        assert len(stores[1].unfinished()) == 1
    finally:
        for store in stores:
            store.close()


def test_a_serialization_failure_is_aborted_for_a_retry(postgres_url: str) -> None:
    db = Database(postgres_url, ITEMS)
    try:
        with pytest.raises(Aborted, match="retry") as raised, db.transaction() as tx:
            tx.run("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        assert raised.value.reason.name == "ABORTED"
        with db.transaction() as tx:  # the session is usable again
            tx.insert("items", {"item_id": "i_1", "label": "x"})
    finally:
        db.close()


def test_placeholders_become_psycopgs_outside_string_literals() -> None:
    sql = "SELECT '?', label FROM items WHERE label LIKE '5%' AND item_id = ? AND n % 2 = ?"
    assert engines.postgres_sql(sql) == (
        "SELECT '?', label FROM items WHERE label LIKE '5%%' AND item_id = %s AND n %% 2 = %s"
    )


def test_the_portable_ddl_becomes_postgresql_types() -> None:
    ddl = "seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ns INTEGER NOT NULL, body BLOB"
    assert engines.postgres_ddl(ddl) == (
        "seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, at_ns BIGINT NOT NULL, body BYTEA"
    )


def test_a_postgresql_url_gets_the_services_schema_unless_it_names_one() -> None:
    assert target_of_url("postgresql://db/paymesh", schema="order_service") == (
        "postgresql://db/paymesh?schema=order_service"
    )
    named = "postgresql://u:secret@db/paymesh?sslmode=require&schema=orders"
    assert target_of_url(named, schema="order_service") == named
    with pytest.raises(engines.UnsupportedDatabaseUrl, match="lower-case identifier") as bad:
        target_of_url("postgresql://u:secret@db/x?schema=Drop;", schema="s")
    assert "secret" not in str(bad.value)


def test_the_shared_url_gives_each_service_its_schema_and_its_own_url_wins() -> None:
    shared = {SHARED_DATABASE_VAR: "postgresql://db/paymesh"}
    assert database_target("order-service", shared) == (
        "postgresql://db/paymesh?schema=order_service"
    )
    own = {**shared, "ORDER_SERVICE_DATABASE_URL": "sqlite:///var/orders.db"}
    assert database_target("order-service", own) == Path("var/orders.db")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({SHARED_DATABASE_VAR: "sqlite:///all.db"}, "must be a postgresql:// URL"),
        ({"ORDER_SERVICE_DATABASE_URL": "mysql://db/x"}, "ORDER_SERVICE_DATABASE_URL="),
        ({SHARED_DATABASE_VAR: "postgresql://db/x?schema=no-dash"}, "lower-case identifier"),
    ],
)
def test_a_database_url_no_engine_serves_is_refused_at_start(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(StartupError, match=message):
        database_target("order-service", environ)


async def test_the_health_probe_reads_a_postgresql_database(postgres_url: str) -> None:
    Database(postgres_url, ITEMS).close()
    assert await check_database(postgres_url, timeout_s=5) == (Health.SERVING, "")


async def test_the_health_probe_of_a_postgresql_server_that_is_down_fails_without_the_password(
    postgres_cluster: LocalCluster,
) -> None:
    down = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/paymesh"
    health, error = await check_database(down, timeout_s=2)
    assert health is not Health.SERVING and error
    assert "hunter2" not in error


def test_a_dropped_postgresql_connection_fails_one_call_and_the_next_reconnects(
    postgres_url: str, postgres_database: str
) -> None:
    db = Database(postgres_url, ITEMS)
    try:
        pid = db.aggregate("SELECT pg_backend_pid() AS pid")["pid"]
        with psycopg.connect(postgres_database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DatabaseError):  # the server restarted under this call
            with db.transaction() as tx:
                tx.insert("items", {"item_id": "i_lost", "label": "x"})
        with db.transaction() as tx:
            tx.insert("items", {"item_id": "i_1", "label": "x"})
        assert db.aggregate("SELECT COUNT(*) AS n FROM items")["n"] == 1
    finally:
        db.close()


def test_a_table_a_base_module_registers_is_migrated_into_every_database(
    database_target: Callable[[str], Target], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "BASE_TABLES", dict(sql.BASE_TABLES))
    sql.register_base_tables(
        "tallies",
        "CREATE TABLE IF NOT EXISTS tallies (name TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    )
    db = Database(database_target("items"), ITEMS)
    try:
        assert db.applied[-2:] == ["tallies 1", "items 1"]
        assert db.columns("tallies") == ["name", "count"]
    finally:
        db.close()


def test_make_migrate_migrates_every_service_once(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path)}
    if engine == "postgresql":
        cluster: LocalCluster = request.getfixturevalue("postgres_cluster")
        environ[SHARED_DATABASE_VAR] = cluster.create_database("migrate_once")
    first = migrate_all(environ)
    assert len(first) == len(SERVICES)
    assert all(f"{idempotency.COMPONENT} 1" in line for line in first), first
    assert all(line.endswith(": up to date") for line in migrate_all(environ))
