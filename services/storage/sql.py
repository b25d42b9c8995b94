"""The store base: one service's database behind one small seam every store writes through.

A store says its SQL once, with ``?`` placeholders and plain ``SELECT``/``UPDATE``/``DELETE``;
inserts and upserts go through :meth:`Statements.insert` and :meth:`Statements.upsert`,
keyset pages through :meth:`Statements.page`, writes through one :meth:`Database.transaction`,
and "claim the request id, run, record the reply, replay on repeat" through
:meth:`Database.idempotent`. Every time column holds integer nanoseconds since the epoch
(``*_ns``), the unit of protobuf ``Timestamp``. SQLite is the engine behind it today; a second
engine implements :class:`Statements` and :class:`Database` (translating the ``?``
placeholders) and no servicer changes. What stays engine-specific is named: each store's
``SCHEMA`` (its DDL) and, here only, the pragmas, the catalogue reads and the in-place upgrade.

Stores are synchronous: a handler runs a store method on the event loop, one at a time per
process; ``BEGIN IMMEDIATE`` makes each write atomic and unique keys make claims race-free.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Reason
from services.mesh.errors import Aborted
from services.mesh.validation import quote
from services.storage import idempotency

#: A row read back: its columns by name (``row["order_id"]``).
Row = sqlite3.Row
#: The database errors a store may meet (a lost or locked file, say).
DatabaseError = sqlite3.Error
#: The only URL scheme this engine serves: ``sqlite:///relative/or//absolute/path``.
SQLITE_SCHEME = "sqlite:///"

ResponseT = TypeVar("ResponseT", bound=Message)

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
    "PRAGMA synchronous=NORMAL",
)
#: Whether a request id has a record at all (claimed, done or expired).
_RECORD_EXISTS = "SELECT 1 FROM idempotency_keys WHERE method = ? AND request_id = ?"
#: Time columns whose seconds-era name was not ``<name>`` of ``<name>_ns``.
_OLDER_NAMES = {"create_time_ns": ("created_at",), "purge_time_ns": ("purged_at",)}


class UnsupportedDatabaseUrl(ValueError):
    """A ``*_DATABASE_URL`` this build has no engine for."""


def path_of_url(url: str) -> Path:
    """The file a ``sqlite:///path`` URL names.

    Raises:
        UnsupportedDatabaseUrl: any other scheme.
    """
    if not url.startswith(SQLITE_SCHEME):
        raise UnsupportedDatabaseUrl(f"{url!r}: only {SQLITE_SCHEME}path URLs are supported")
    return Path(url.removeprefix(SQLITE_SCHEME))


def probe(path: Path, timeout_s: float) -> None:
    """Read the database at ``path`` once, never creating it (a service's health probe).

    Raises:
        DatabaseError: the file is missing, locked past ``timeout_s`` or unreadable.
    """
    # mode=rw: a missing file is a failure, not a new empty database.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout_s)
    try:
        # Reading the schema touches the file, so a corrupt one fails here too.
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    finally:
        conn.close()


def timestamp(nanos: int) -> Timestamp:
    """The protobuf Timestamp of a time column (nanoseconds since the epoch)."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(nanos))
    return stamp


def seconds_to_ns(seconds: float) -> int:
    """Nanoseconds of a time in seconds (a clock that speaks seconds, a config value)."""
    return round(seconds * 1_000_000_000)


def ns_to_seconds(nanos: int) -> float:
    """Seconds of a time column, for code that schedules in seconds."""
    return nanos / 1_000_000_000


@dataclass(frozen=True, slots=True)
class Earlier:
    """What an earlier request with the same id left behind."""

    state: Literal["new", "done", "in_flight"]
    """No earlier request, a completed one, or one that started and has not finished."""
    response: bytes | None = None
    """The stored response when ``done``."""


class Statements:
    """The statements a store runs: reads outside a transaction, anything inside one."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        """The first row of a query, or ``None``."""
        row: Row | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    def aggregate(self, sql: str, params: Sequence[object] = ()) -> Row:
        """The one row of an aggregate query (``COUNT``, ``SUM``) without ``GROUP BY``."""
        row = self.one(sql, params)
        if row is None:
            raise DatabaseError(f"an aggregate query returned no row: {sql}")
        return row

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Every row of a query."""
        return list(self._conn.execute(sql, tuple(params)).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one ``UPDATE``/``DELETE``; returns how many rows it changed."""
        return int(self._conn.execute(sql, tuple(params)).rowcount)

    def run_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter row."""
        self._conn.executemany(sql, (tuple(row) for row in rows))

    def insert(
        self, table: str, values: Mapping[str, object], *, unless_exists: bool = False
    ) -> bool:
        """Insert one row; returns whether it was inserted.

        Args:
            unless_exists: a row that conflicts on a unique key is kept and nothing is
                inserted (``False`` then), instead of an integrity error.
        """
        return self.insert_many(table, [values], unless_exists=unless_exists) == 1

    def insert_many(
        self,
        table: str,
        rows: Sequence[Mapping[str, object]],
        *,
        unless_exists: bool = False,
    ) -> int:
        """Insert rows (all with the columns of the first); returns how many were inserted."""
        if not rows:
            return 0
        columns = list(rows[0])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)})"
            f" VALUES ({', '.join('?' for _ in columns)})"
            + (" ON CONFLICT DO NOTHING" if unless_exists else "")
        )
        before = self._conn.total_changes
        self._conn.executemany(sql, ([row[c] for c in columns] for row in rows))
        return self._conn.total_changes - before

    def upsert(
        self,
        table: str,
        values: Mapping[str, object],
        *,
        key: Sequence[str],
        update: Sequence[str] | None = None,
    ) -> None:
        """Insert one row or, if one with the same ``key`` columns exists, update it.

        Args:
            update: the columns a conflict overwrites with the new values; all but the key
                if not given.
        """
        columns = list(values)
        changed = [c for c in columns if c not in key] if update is None else list(update)
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)})"
            f" VALUES ({', '.join('?' for _ in columns)})"
            f" ON CONFLICT ({', '.join(key)}) DO "
            + (
                "UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in changed)
                if changed
                else "NOTHING"
            )
        )
        self._conn.execute(sql, [values[c] for c in columns])

    def update(self, table: str, values: Mapping[str, object], **where: object) -> int:
        """Set ``values`` on the rows whose columns equal ``where``; returns how many."""
        sets = ", ".join(f"{column} = ?" for column in values)
        clause = " AND ".join(f"{column} = ?" for column in where)
        return self.run(
            f"UPDATE {table} SET {sets} WHERE {clause}", [*values.values(), *where.values()]
        )

    def page(
        self,
        table: str,
        *,
        order: Sequence[str],
        cursor: Sequence[object] | None,
        limit: int,
        where: Mapping[str, object] | None = None,
        newest_first: bool = True,
        extra: str = "",
        extra_params: Sequence[object] = (),
    ) -> list[Row]:
        """One keyset page of ``table``: rows past the cursor, in ``order``.

        Args:
            order: the columns the page is sorted on, unique together (time, then id).
            cursor: the ``order`` values of the previous page's last row (``None`` for the
                first page); rows strictly past it come back.
            where: equality filters, column to value.
            newest_first: descending order (the List RPCs' contract) or ascending.
            extra: one more condition in this store's SQL, with ``extra_params``.
        """
        clauses = [f"{column} = ?" for column in (where or {})]
        params: list[object] = list((where or {}).values())
        if extra:
            clauses.append(f"({extra})")
            params.extend(extra_params)
        if cursor is not None:
            clauses.append(
                f"({', '.join(order)}) {'<' if newest_first else '>'}"
                f" ({', '.join('?' for _ in order)})"
            )
            params.extend(cursor)
        direction = " DESC" if newest_first else ""
        return self.all(
            f"SELECT * FROM {table}"
            + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            + f" ORDER BY {', '.join(column + direction for column in order)} LIMIT ?",
            [*params, limit],
        )


class Database(Statements):
    """One service's database: opened with its schema, one write transaction at a time.

    A store's reads and writes share one session: a read inside a :meth:`transaction` block,
    through the block's statements or the database's, sees that transaction's writes.

    Args:
        path: the file (``ServiceContext.database_path()``); ``:memory:`` in tests.
        schema: ``CREATE ... IF NOT EXISTS`` statements, applied at open.
        clock_ns: the store's clock, nanoseconds since the epoch (tests pass their own).

    A file an older version made with times in seconds (``REAL`` columns) is upgraded in
    place at open: its tables are rebuilt with the times in nanoseconds, rows kept.
    """

    def __init__(
        self, path: Path | str, schema: str, *, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        super().__init__(conn)
        self.path = Path(path)
        self.clock_ns = clock_ns
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        self._upgrade_time_units(schema)
        conn.executescript(schema)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield Statements(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def idempotent(
        self,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        run: Callable[[Statements], ResponseT],
        *,
        request_id: str | None = None,
        kept_in: tuple[str, str] | None = None,
        recorded: Callable[[ResponseT], ResponseT] | None = None,
    ) -> ResponseT:
        """Claim the request id, ``run``, record its response, all in one transaction.

        The same id with the same body returns the stored response without running; a
        failing ``run`` rolls everything back, the claim included, so a retry runs anew.

        Args:
            request_id: the key claimed; ``request.request_id`` if not given.
            kept_in: ``(table, column)`` whose rows keep their request id: a new claim of an
                id such a row still carries is AlreadyExists (its record expired, the work
                did not).
            recorded: what of the response replays return, if not all of it (a secret that
                must leave the process once is dropped here).

        Raises:
            InvalidArgument: the id was used with a different body.
            Aborted: an identical request is still executing.
        """
        key = idempotency.request_id_of(request) if request_id is None else request_id
        with self.transaction() as tx:
            earlier = self.claim(
                tx, method, request, response_type, request_id=key, kept_in=kept_in
            )
            if earlier is not None:
                return earlier
            response = run(tx)
            self.complete(tx, method, key, response if recorded is None else recorded(response))
            return response

    # -- work that spans a call elsewhere: claimed in one transaction, completed in a later one

    def claim(
        self,
        tx: Statements,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        request_id: str | None = None,
        kept_in: tuple[str, str] | None = None,
    ) -> ResponseT | None:
        """Claim the request id inside ``tx``; the stored response if it is a replay.

        ``None`` means the caller now owns the id: it records the reply with
        :meth:`complete` (or frees the id with :meth:`release`) in a later transaction.
        Arguments and errors as :meth:`idempotent`'s.
        """
        key = idempotency.request_id_of(request) if request_id is None else request_id
        claimed = idempotency.claim(tx, method, key, request, now_ns=self.clock_ns())
        if claimed.replay is not None:
            return response_type.FromString(claimed.replay)
        if kept_in is not None:
            idempotency.refuse_if_kept(tx, *kept_in, key)
        return None

    @staticmethod
    def complete(tx: Statements, method: str, request_id: str, response: Message) -> None:
        """Record the reply of a claimed request id; replays return it from now on."""
        idempotency.complete(tx, method, request_id, response)

    @staticmethod
    def release(tx: Statements, method: str, request_id: str) -> None:
        """Free a claimed request id whose work had no effect, so a retry runs anew."""
        idempotency.release(tx, method, request_id)

    def earlier(self, method: str, request: Message, *, request_id: str | None = None) -> Earlier:
        """What an earlier request with this id left, without claiming it.

        For work that must look before it calls elsewhere; the claim comes with its write.

        Raises:
            InvalidArgument: the id was used with a different body.
        """
        key = idempotency.request_id_of(request) if request_id is None else request_id
        # The usual case, an id never seen, is a plain read: no write transaction to commit.
        if self.one(_RECORD_EXISTS, (method, key)) is None:
            return Earlier("new")
        with self.transaction() as tx:
            try:
                claimed = idempotency.claim(tx, method, key, request, now_ns=self.clock_ns())
            except Aborted:
                return Earlier("in_flight")
            if claimed.replay is not None:
                return Earlier("done", claimed.replay)
            idempotency.release(tx, method, key)
            return Earlier("new")

    def replay(
        self,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        request_id: str | None = None,
    ) -> ResponseT | None:
        """The stored response of an earlier identical request, without claiming the id.

        Raises:
            InvalidArgument: the id was used with a different body.
            Aborted: an identical request is still executing.
        """
        found = self.earlier(method, request, request_id=request_id)
        if found.state == "in_flight":
            key = idempotency.request_id_of(request) if request_id is None else request_id
            raise Aborted(
                f"the first request with request_id {quote(key)} is still in flight; retry later",
                reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
            )
        return None if found.response is None else response_type.FromString(found.response)

    # -- schema upkeep, for files an older version made ---------------------------------

    def table_sql(self, table: str) -> str | None:
        """The ``CREATE TABLE`` statement ``table`` was made with, or ``None`` if absent."""
        row = self.one("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", [table])
        return None if row is None else str(row["sql"])

    def columns(self, table: str) -> list[str]:
        """The column names of ``table`` (empty if it does not exist)."""
        return list(self._columns(self._conn, table))

    def rebuild(self, schema: str, tables: Mapping[str, Mapping[str, str]]) -> None:
        """Move each table's rows into a table ``schema`` makes anew, in one transaction.

        For changes an engine cannot make in place (a ``CHECK`` listing values, a column's
        type). ``tables`` maps each table to its new columns' values, as SQL over the old
        columns; a new column not named there takes its default.
        """
        renamed: list[str] = []
        for table in tables:
            indexes = self.all(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
                " AND sql IS NOT NULL",
                [table],
            )
            renamed.append(f"ALTER TABLE {table} RENAME TO {table}_before_upgrade;")
            renamed.extend(f"DROP INDEX {index['name']};" for index in indexes)
        copies = [
            f"INSERT INTO {table} ({', '.join(values)})"
            f" SELECT {', '.join(values.values())} FROM {table}_before_upgrade;"
            for table, values in tables.items()
        ]
        drops = [f"DROP TABLE {table}_before_upgrade;" for table in reversed(list(tables))]
        script = "\n".join(["BEGIN IMMEDIATE;", *renamed, schema, *copies, *drops])
        # SQLite's own recipe for a rebuild: foreign keys off (rows move between tables
        # whose parents are being rebuilt too) and a rename that leaves the references of
        # other tables alone (they name the table, which the rebuilt one is again).
        self._conn.execute("PRAGMA foreign_keys=OFF")
        self._conn.execute("PRAGMA legacy_alter_table=ON")
        try:
            self._conn.executescript(script)  # leaves its transaction open, to check first
            broken = self.all("PRAGMA foreign_key_check")
            if broken:
                raise DatabaseError(
                    f"rebuilding {', '.join(tables)} would break {len(broken)} references"
                )
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._conn.execute("PRAGMA legacy_alter_table=OFF")
            self._conn.execute("PRAGMA foreign_keys=ON")

    def _columns(self, conn: sqlite3.Connection, table: str) -> dict[str, str]:
        return {
            str(info["name"]): str(info["type"]).upper()
            for info in conn.execute(f"PRAGMA table_info({table})")
        }

    def _upgrade_time_units(self, schema: str) -> None:
        """Rebuild the tables an older version made with times in seconds (``REAL``).

        Every ``<name>_ns`` column the schema has is filled from the old ``<name>`` (or its
        older name) scaled to nanoseconds; the other columns are copied as they are.
        """
        target = sqlite3.connect(":memory:")
        target.row_factory = sqlite3.Row
        try:
            target.executescript(schema)
            wanted = {
                str(row["name"]): self._columns(target, str(row["name"]))
                for row in target.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            target.close()
        plans: dict[str, dict[str, str]] = {}
        for table, columns in wanted.items():
            old = self._columns(self._conn, table)
            values = {column: column for column in columns if column in old}
            for column in columns:
                sources = (column.removesuffix("_ns"), *_OLDER_NAMES.get(column, ()))
                source = next((name for name in sources if old.get(name) == "REAL"), None)
                if column.endswith("_ns") and column not in old and source is not None:
                    # Whole seconds in integers, then the fraction: exact to the nanosecond
                    # the old float held (one float product would round to ~256 ns).
                    whole = f"CAST({source} AS INTEGER)"
                    values[column] = (
                        f"{whole} * 1000000000"
                        f" + CAST(ROUND(({source} - {whole}) * 1000000000) AS INTEGER)"
                    )
            if any(column not in old for column in values):
                plans[table] = values
        if plans:
            self.rebuild(schema, plans)
