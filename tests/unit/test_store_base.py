"""The store base: one transaction per idempotent write, keyset pages, upserts, one time unit.

Each store test runs on both engines (a SQLite file, a fresh PostgreSQL schema); the old-file
tests write SQLite tables exactly as the version before nanosecond times made them and open
them with today's store.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from services.mesh.errors import Aborted, InvalidArgument
from services.order.store import OrderStore
from services.storage import idempotency
from services.storage.sql import (
    Database,
    Statements,
    Target,
    UnsupportedDatabaseUrl,
    path_of_url,
)

ITEMS = (
    """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    create_time_ns INTEGER NOT NULL
);
"""
    + idempotency.SCHEMA
)
START_NS = 1_700_000_000_000_000_000


class Clock:
    """Nanoseconds that move only when told."""

    def __init__(self) -> None:
        self.now_ns = START_NS

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
def db(database_target: Callable[[str], Target]) -> Iterator[Database]:
    database = Database(database_target("items"), ITEMS, clock_ns=Clock())
    yield database
    database.close()


def _request(request_id: str, order_id: str = "o_1") -> order_pb2.UpdateOrderStatusRequest:
    # Any message with a request_id serves as the request whose body is fingerprinted.
    return order_pb2.UpdateOrderStatusRequest(request_id=request_id, order_id=order_id)


def _insert(item_id: str) -> Callable[[Statements], order_pb2.UpdateOrderStatusResponse]:
    def run(tx: Statements) -> order_pb2.UpdateOrderStatusResponse:
        tx.insert("items", {"item_id": item_id, "label": "x", "create_time_ns": START_NS})
        return order_pb2.UpdateOrderStatusResponse(
            order=order_pb2.Order(order_id=item_id, description="first")
        )

    return run


def _count(db: Database, table: str) -> int:
    return int(db.aggregate(f"SELECT COUNT(*) AS n FROM {table}")["n"])


def test_idempotent_write_replays_the_stored_response_without_running_again(
    db: Database,
) -> None:
    runs: list[str] = []

    def run(tx: Statements) -> order_pb2.UpdateOrderStatusResponse:
        runs.append("ran")
        tx.insert("items", {"item_id": f"i_{len(runs)}", "label": "x", "create_time_ns": 1})
        return order_pb2.UpdateOrderStatusResponse(order=order_pb2.Order(order_id="i_1"))

    method, response = "Test", order_pb2.UpdateOrderStatusResponse
    first = db.idempotent(method, _request("r_1"), response, run)
    again = db.idempotent(method, _request("r_1"), response, run)
    assert again == first
    assert runs == ["ran"]
    assert _count(db, "items") == 1


def test_a_failing_write_rolls_back_its_claim_so_a_retry_runs(db: Database) -> None:
    def fails(tx: Statements) -> order_pb2.UpdateOrderStatusResponse:
        tx.insert("items", {"item_id": "i_1", "label": "x", "create_time_ns": 1})
        raise RuntimeError("the write fails after its insert")

    with pytest.raises(RuntimeError):
        db.idempotent("Test", _request("r_1"), order_pb2.UpdateOrderStatusResponse, fails)
    assert (_count(db, "items"), _count(db, "idempotency_keys")) == (0, 0)
    db.idempotent("Test", _request("r_1"), order_pb2.UpdateOrderStatusResponse, _insert("i_1"))
    assert _count(db, "items") == 1


def test_the_same_request_id_with_another_body_is_invalid_argument(db: Database) -> None:
    response = order_pb2.UpdateOrderStatusResponse
    db.idempotent("Test", _request("r_1"), response, _insert("i_1"))
    with pytest.raises(InvalidArgument):
        db.idempotent("Test", _request("r_1", "o_2"), response, _insert("i_2"))


def test_recorded_keeps_a_secret_out_of_the_replay(db: Database) -> None:
    def run(tx: Statements) -> order_pb2.UpdateOrderStatusResponse:
        return order_pb2.UpdateOrderStatusResponse(
            order=order_pb2.Order(order_id="o_1", description="secret")
        )

    def without_secret(
        response: order_pb2.UpdateOrderStatusResponse,
    ) -> order_pb2.UpdateOrderStatusResponse:
        return order_pb2.UpdateOrderStatusResponse(
            order=order_pb2.Order(order_id=response.order.order_id)
        )

    response_type = order_pb2.UpdateOrderStatusResponse
    first = db.idempotent("Test", _request("r_1"), response_type, run, recorded=without_secret)
    again = db.idempotent("Test", _request("r_1"), response_type, run, recorded=without_secret)
    assert first.order.description == "secret"
    assert again.order.description == ""


def test_replay_looks_without_claiming(db: Database) -> None:
    response = order_pb2.UpdateOrderStatusResponse
    assert db.replay("Test", _request("r_1"), response) is None
    assert _count(db, "idempotency_keys") == 0  # nothing claimed
    first = db.idempotent("Test", _request("r_1"), response, _insert("i_1"))
    assert db.replay("Test", _request("r_1"), response) == first


def test_a_look_at_a_new_request_id_takes_no_write_lock(db: Database) -> None:
    # Another writer (a second replica) holds the database's write lock: a look that needed
    # a write would wait for it.
    writer = Database(db.target, ITEMS)
    try:
        with writer.transaction():
            assert db.earlier("Test", _request("r_new")).state == "new"
    finally:
        writer.close()
    db.idempotent("Test", _request("r_1"), order_pb2.UpdateOrderStatusResponse, _insert("i_1"))
    assert db.earlier("Test", _request("r_1")).state == "done"


def test_a_claim_in_flight_is_aborted(db: Database) -> None:
    with db.transaction() as tx:
        idempotency.claim(tx, "Test", "r_1", _request("r_1"), now_ns=START_NS)
    with pytest.raises(Aborted):
        db.idempotent("Test", _request("r_1"), order_pb2.UpdateOrderStatusResponse, _insert("i"))


def test_upsert_inserts_then_overwrites_only_the_named_columns(db: Database) -> None:
    with db.transaction() as tx:
        tx.upsert("items", {"item_id": "i_1", "label": "a", "create_time_ns": 1}, key=["item_id"])
        tx.upsert(
            "items",
            {"item_id": "i_1", "label": "b", "create_time_ns": 2},
            key=["item_id"],
            update=["label"],
        )
    row = db.one("SELECT label, create_time_ns FROM items WHERE item_id = 'i_1'")
    assert row is not None
    assert (row["label"], row["create_time_ns"]) == ("b", 1)


def test_insert_unless_exists_keeps_the_first_row(db: Database) -> None:
    with db.transaction() as tx:
        assert tx.insert("items", {"item_id": "i_1", "label": "a", "create_time_ns": 1})
        assert not tx.insert(
            "items", {"item_id": "i_1", "label": "b", "create_time_ns": 2}, unless_exists=True
        )
    row = db.one("SELECT label FROM items WHERE item_id = 'i_1'")
    assert row is not None and row["label"] == "a"


@pytest.mark.parametrize("newest_first", [True, False])
def test_keyset_pages_cover_every_row_once_in_order(db: Database, newest_first: bool) -> None:
    # Times tie for some rows and ids run against time, so only (time, id) orders them.
    rows = [("i_9", 1), ("i_5", 2), ("i_7", 2), ("i_1", 3), ("i_3", 4)]
    with db.transaction() as tx:
        tx.insert_many(
            "items", [{"item_id": i, "label": "x", "create_time_ns": t} for i, t in rows]
        )
    expected = sorted(rows, key=lambda r: (r[1], r[0]), reverse=newest_first)
    seen: list[tuple[str, int]] = []
    cursor: tuple[int, str] | None = None
    while True:
        page = db.page(
            "items",
            order=("create_time_ns", "item_id"),
            cursor=cursor,
            limit=2,
            newest_first=newest_first,
        )
        seen.extend((row["item_id"], row["create_time_ns"]) for row in page)
        if len(page) < 2:
            break
        cursor = (page[-1]["create_time_ns"], page[-1]["item_id"])
    assert seen == expected


#: The orders and idempotency tables as the version with times in seconds made them.
SECONDS_ERA = """
CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    status INTEGER NOT NULL,
    merchant_order_reference TEXT NOT NULL,
    description TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    create_time REAL NOT NULL,
    update_time REAL NOT NULL
);
CREATE INDEX orders_by_merchant ON orders (merchant_id, create_time, order_id);
CREATE TABLE idempotency_keys (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    response BLOB,
    created_at REAL NOT NULL,
    PRIMARY KEY (method, request_id)
);
CREATE INDEX idempotency_keys_done_by_age
    ON idempotency_keys (created_at) WHERE state = 'done';
CREATE TABLE idempotency_purge (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    purged_at REAL NOT NULL
);
"""


def test_a_file_with_times_in_seconds_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "order-service.db"
    created_s = 1_700_000_000.25
    create = order_pb2.CreateOrderRequest(
        request_id="r_1",
        order_id="o_old",
        merchant_id="m_1",
        payment_id="pay_1",
        amount=common_pb2.Money(amount_minor=500, currency_code="EUR"),
    )
    stored = order_pb2.CreateOrderResponse(order=order_pb2.Order(order_id="o_old"))
    with contextlib.closing(sqlite3.connect(path)) as old, old:
        old.executescript(SECONDS_ERA)
        old.execute(
            "INSERT INTO orders VALUES ('o_old', 'm_1', 'pay_1', 500, 'EUR', 1, '', '', '', ?, ?)",
            (created_s, created_s),
        )
        old.execute(
            "INSERT INTO idempotency_keys VALUES ('CreateOrder', 'r_1', ?, 'done', ?, ?)",
            (idempotency.fingerprint(create), stored.SerializeToString(), created_s),
        )
        old.execute("INSERT INTO idempotency_purge VALUES (0, ?)", (created_s,))

    store = OrderStore(path, clock=lambda: created_s + 60)
    try:
        order = store.get("o_old")
        assert order.create_time.ToNanoseconds() == 1_700_000_000_250_000_000
        assert store.create(create) == stored.order  # the old record still replays
        later = store.create(
            order_pb2.CreateOrderRequest(
                request_id="r_2",
                order_id="o_new",
                merchant_id="m_1",
                payment_id="pay_2",
                amount=common_pb2.Money(amount_minor=700, currency_code="EUR"),
            )
        )
        newest = store.list(merchant_id="m_1", status=0, before=None, limit=10)
        assert [o.order_id for o in newest] == [later.order_id, "o_old"]
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as upgraded:
        types = {
            (table, row[1]): row[2]
            for table in ("orders", "idempotency_keys", "idempotency_purge")
            for row in upgraded.execute(f"PRAGMA table_info({table})")
        }
        indexes = {row[0] for row in upgraded.execute("SELECT name FROM sqlite_master")}
    assert types[("orders", "create_time_ns")] == "INTEGER"
    assert types[("idempotency_keys", "create_time_ns")] == "INTEGER"
    assert types[("idempotency_purge", "purge_time_ns")] == "INTEGER"
    assert not any(column.endswith(("_time", "_at")) for _, column in types)
    assert {"orders_by_merchant", "idempotency_keys_done_by_age"} <= indexes
    assert not any(name.endswith("_before_upgrade") for name in indexes)


def test_only_sqlite_urls_name_a_file() -> None:
    assert path_of_url("sqlite:///var/order.db") == Path("var/order.db")
    assert path_of_url("sqlite:////abs/order.db") == Path("/abs/order.db")
    with pytest.raises(UnsupportedDatabaseUrl, match="only sqlite:///path"):
        path_of_url("postgres://nowhere/orders")


#: A parent with times in seconds and a child that references it, as an older version made them.
PARENT_AND_CHILD_SECONDS = """
CREATE TABLE parents (parent_id TEXT PRIMARY KEY, create_time REAL NOT NULL);
CREATE TABLE children (
    child_id TEXT PRIMARY KEY,
    parent_id TEXT NOT NULL REFERENCES parents (parent_id),
    create_time REAL NOT NULL
);
INSERT INTO parents VALUES ('p_1', 1.5);
INSERT INTO children VALUES ('c_1', 'p_1', 2.5);
"""
PARENT_AND_CHILD = """
CREATE TABLE IF NOT EXISTS parents (parent_id TEXT PRIMARY KEY, create_time_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS children (
    child_id TEXT PRIMARY KEY,
    parent_id TEXT NOT NULL REFERENCES parents (parent_id),
    create_time_ns INTEGER NOT NULL
);
"""


def test_an_upgrade_keeps_rows_and_references_between_rebuilt_tables(tmp_path: Path) -> None:
    path = tmp_path / "family.db"
    with contextlib.closing(sqlite3.connect(path)) as old, old:
        old.executescript(PARENT_AND_CHILD_SECONDS)
    db = Database(path, PARENT_AND_CHILD)
    try:
        child = db.one("SELECT * FROM children")
        assert child is not None
        assert (child["parent_id"], child["create_time_ns"]) == ("p_1", 2_500_000_000)
        with db.transaction() as tx:  # the child still references the (rebuilt) parents
            tx.insert("children", {"child_id": "c_2", "parent_id": "p_1", "create_time_ns": 3})
        with pytest.raises(sqlite3.IntegrityError), db.transaction() as tx:
            tx.insert("children", {"child_id": "c_3", "parent_id": "p_x", "create_time_ns": 4})
        children_sql = db.table_sql("children") or ""
        assert "REFERENCES parents" in children_sql
        assert "_before_upgrade" not in children_sql
    finally:
        db.close()
