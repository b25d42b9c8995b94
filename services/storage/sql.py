"""The store base: one service's database behind one small seam every store writes through.

A store says its SQL once, with ``?`` placeholders and plain ``SELECT``/``UPDATE``/``DELETE``;
inserts and upserts go through :meth:`Statements.insert` and :meth:`Statements.upsert`,
keyset pages through :meth:`Statements.page`, writes through one :meth:`Database.transaction`,
and "claim the request id, run, record the reply, replay on repeat" through
:meth:`Database.idempotent`. Every time column holds integer nanoseconds since the epoch
(``*_ns``), the unit of protobuf ``Timestamp``. Two engines stand behind it, one code path:
SQLite (a ``sqlite:///`` URL or a path; the default) and PostgreSQL (a ``postgresql://`` URL,
a schema per service); :mod:`services.storage.engines` holds everything that differs.

A store's schema is an ordered list of migrations (:class:`Migrations`), each one DDL text in
the portable subset (``INTEGER``, ``TEXT``, ``BLOB``, ``INTEGER PRIMARY KEY AUTOINCREMENT``,
``CREATE ... IF NOT EXISTS``), applied at open under the database's write lock and recorded in
``schema_migrations``; the base's own tables (idempotency keys, and whatever a base module
registers with :func:`register_base_tables`) are migrated the same way. Stores are
synchronous: a handler runs a store method on the event loop, one at a time per process; the
write lock makes each write atomic and unique keys make claims race-free.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Reason
from services.mesh.batch import ItemOutcome
from services.mesh.errors import Aborted, ServiceError
from services.mesh.validation import quote
from services.storage import engines, idempotency
from services.storage.engines import (
    Engine,
    PostgresSession,
    Session,
    SqliteSession,
    is_postgres,
    split_statements,
)

log = logging.getLogger("paymesh.storage")


class Row(Protocol):
    """A row read back: its columns by name (``row["order_id"]``) or position."""

    def __getitem__(self, key: Any, /) -> Any: ...

    def keys(self) -> list[str]:
        """The column names."""
        ...


#: A ``*_DATABASE_URL`` this build has no engine for.
UnsupportedDatabaseUrl = engines.UnsupportedDatabaseUrl


class StoreError(Exception):
    """The store base found the database not as it must be (a changed migration, say)."""


#: The database errors a store may meet, either engine (a lost file, a dropped connection).
DatabaseError: tuple[type[Exception], ...] = (*engines.ERRORS, StoreError)
#: Where a database is: a SQLite file, or a PostgreSQL URL (a ``str`` starting ``postgresql://``).
Target = Path | str
#: The SQLite URL scheme: ``sqlite:///relative/or//absolute/path``.
SQLITE_SCHEME = "sqlite:///"
#: The PostgreSQL URL schemes (``postgresql://user@host:port/db?schema=name``).
POSTGRES_SCHEMES = engines.POSTGRES_SCHEMES

ResponseT = TypeVar("ResponseT", bound=Message)
RequestT = TypeVar("RequestT", bound=Message)


def _run_item(
    run: Callable[[Statements, RequestT], ResponseT], request: RequestT, tx: Statements
) -> ResponseT:
    return run(tx, request)


#: Whether a request id has a record at all (claimed, done or expired).
_RECORD_EXISTS = "SELECT 1 FROM idempotency_keys WHERE method = ? AND request_id = ?"
#: Time columns whose seconds-era name was not ``<name>`` of ``<name>_ns``.
_OLDER_NAMES = {"create_time_ns": ("created_at",), "purge_time_ns": ("purged_at",)}
#: Which migration of which component a database has had, and of what text.
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    apply_time_ns INTEGER NOT NULL,
    PRIMARY KEY (component, version)
)
"""
_ADDITIVE = re.compile(r"CREATE\s+(TABLE|(UNIQUE\s+)?INDEX)\s+IF\s+NOT\s+EXISTS\b", re.IGNORECASE)
_FIRST_TABLE = re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Migrations:
    """One component's schema: its migrations in order, version 1 first.

    Append a migration to change the schema; never edit one a database may have applied
    (the base refuses a changed one, unless it only creates what is missing).
    """

    component: str
    """Its name in ``schema_migrations`` (a store's first table unless named)."""
    steps: tuple[str, ...]
    """Each migration's DDL: ``;``-separated statements of the portable subset."""

    @classmethod
    def of(cls, schema: str | Sequence[str], component: str | None = None) -> Migrations:
        """A store's migrations: one DDL text (version 1) or the list of them."""
        steps = (schema,) if isinstance(schema, str) else tuple(schema)
        if not steps:
            raise ValueError("a store needs at least one migration")
        if component is None:
            first = _FIRST_TABLE.search(steps[0])
            if first is None:
                raise ValueError("migration 1 creates no table: name the component")
            component = first.group(1).lower()
        return cls(component, steps)


#: The base's own tables, migrated into every database before the store's (in this order).
BASE_TABLES: dict[str, Migrations] = {}


def register_base_tables(component: str, *steps: str) -> None:
    """Make every database the base opens carry ``component``'s tables (its migrations).

    For the base's own modules (idempotency keys, leases): registered at import, applied at
    every open and by ``make migrate`` like a store's migrations.
    """
    BASE_TABLES[component] = Migrations(component, tuple(steps))


register_base_tables(idempotency.COMPONENT, idempotency.SCHEMA)


def _checksum(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def migrate(session: Session, migrations: Sequence[Migrations], *, now_ns: int) -> list[str]:
    """Apply what the database lacks of ``migrations``, in one transaction under its write lock.

    Two replicas opening at once queue on the lock: the second finds the first's versions
    recorded and applies nothing. Returns ``component version`` of each migration applied.

    Raises:
        StoreError: an applied migration's text changed and it does more than create what
            is missing (a change must be a new migration).
    """
    applied: list[str] = []
    session.begin()
    try:
        if isinstance(session, PostgresSession):
            session.create_schema()
        session.ddl(_MIGRATIONS_TABLE)
        done = {
            (str(row["component"]), int(row["version"])): str(row["checksum"])
            for row in session.execute(
                "SELECT component, version, checksum FROM schema_migrations"
            ).fetchall()
        }
        for component in migrations:
            for version, text in enumerate(component.steps, start=1):
                checksum = _checksum(text)
                known = done.get((component.component, version))
                if known == checksum:
                    continue
                statements = split_statements(text)
                if known is not None and not all(_ADDITIVE.match(st) for st in statements):
                    raise StoreError(
                        f"migration {version} of {component.component} changed after it was"
                        " applied; append a new migration instead"
                    )
                # A changed migration that only creates what is missing is applied again:
                # its CREATE ... IF NOT EXISTS leave what exists alone.
                for statement in statements:
                    session.ddl(statement)
                session.execute(
                    "INSERT INTO schema_migrations (component, version, checksum, apply_time_ns)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (component, version)"
                    " DO UPDATE SET checksum = excluded.checksum,"
                    " apply_time_ns = excluded.apply_time_ns",
                    (component.component, version, checksum, now_ns),
                )
                applied.append(f"{component.component} {version}")
    except BaseException:
        session.rollback()
        raise
    session.commit()
    if applied:
        log.info("database migrated: %s", ", ".join(applied))
    return applied


def path_of_url(url: str) -> Path:
    """The file a ``sqlite:///path`` URL names.

    Raises:
        UnsupportedDatabaseUrl: any other scheme.
    """
    if not url.startswith(SQLITE_SCHEME):
        raise UnsupportedDatabaseUrl(
            f"{engines.redact(url)!r}: only {SQLITE_SCHEME}path and postgresql://... URLs"
            " are supported"
        )
    return Path(url.removeprefix(SQLITE_SCHEME))


def target_of_url(url: str, *, schema: str) -> Target:
    """What :class:`Database` opens for a ``*_DATABASE_URL``: a SQLite file or a PostgreSQL URL.

    A PostgreSQL URL without ``?schema=`` gets ``schema`` (the service's own).

    Raises:
        UnsupportedDatabaseUrl: another scheme, or a schema that is no plain identifier.
    """
    if is_postgres(url):
        named = engines.with_schema(url, schema)
        engines.PostgresTarget.parse(named)  # a bad schema fails at start, not at first use
        return named
    return path_of_url(url)


def describe(target: Target) -> str:
    """A database for messages: the file, or the URL without its password."""
    return (
        engines.redact(target) if isinstance(target, str) and is_postgres(target) else str(target)
    )


def probe(target: Target, timeout_s: float) -> None:
    """Read the database once, never creating it (a service's health probe).

    ``target`` is a SQLite file or a PostgreSQL URL.

    Raises:
        DatabaseError: missing, locked past ``timeout_s``, unreachable or unreadable.
    """
    engines.probe(target, timeout_s)


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

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def engine(self) -> Engine:
        """The engine behind it: ``sqlite`` or ``postgresql``."""
        return self._session.engine

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        """The first row of a query, or ``None``."""
        row: Row | None = self._session.execute(sql, params).fetchone()
        return row

    def aggregate(self, sql: str, params: Sequence[object] = ()) -> Row:
        """The one row of an aggregate query (``COUNT``, ``SUM``) without ``GROUP BY``."""
        row = self.one(sql, params)
        if row is None:
            raise StoreError(f"an aggregate query returned no row: {sql}")
        return row

    def all(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Every row of a query."""
        return list(self._session.execute(sql, params).fetchall())

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one ``UPDATE``/``DELETE``; returns how many rows it changed."""
        return int(self._session.execute(sql, params).rowcount)

    def run_many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run one statement once per parameter row."""
        self._session.execute_many(sql, rows)

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
        return self._session.execute_many(sql, ([row[c] for c in columns] for row in rows))

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
        self._session.execute(sql, [values[c] for c in columns])

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
        target: a SQLite file (``ServiceContext.database_path()``; ``:memory:`` in tests) or a
            PostgreSQL URL (``postgresql://...?schema=name``).
        schema: the store's migrations (:meth:`Migrations.of`): one DDL text or the list of
            them, applied at open after the base's tables.
        component: the migrations' name; the first table migration 1 creates if not given.
        clock_ns: the store's clock, nanoseconds since the epoch (tests pass their own).

    A SQLite file an older version made with times in seconds (``REAL`` columns) is upgraded
    in place at open: its tables are rebuilt with the times in nanoseconds, rows kept.
    """

    def __init__(
        self,
        target: Path | str,
        schema: str | Sequence[str],
        *,
        component: str | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        session = engines.open_session(target)
        super().__init__(session)
        self.path = Path(target) if session.engine == "sqlite" else None
        self.target = target
        self.clock_ns = clock_ns
        migrations = [*BASE_TABLES.values(), Migrations.of(schema, component)]
        try:
            if isinstance(session, SqliteSession):
                # Files older than the migrations hold version 1 of every component.
                self._upgrade_time_units(";\n".join(m.steps[0] for m in migrations))
            #: What this open applied: ``component version`` per migration, in order.
            self.applied = migrate(session, migrations, now_ns=clock_ns())
        except BaseException:
            session.close()
            raise

    def close(self) -> None:
        """Close the database."""
        self._session.close()

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """One write transaction: committed when the block ends, rolled back on any error.

        It holds the database's write lock from its start (SQLite's ``BEGIN IMMEDIATE``,
        PostgreSQL's per-schema advisory lock), so every read in it sees the latest commit.
        """
        self._session.begin()
        try:
            yield Statements(self._session)
        except BaseException:
            self._session.rollback()
            raise
        self._session.commit()

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
        with self.transaction() as tx:
            response, _ = self._claimed_run(
                tx, method, request, response_type, run, request_id, kept_in, recorded
            )
            return response

    def idempotent_each(
        self,
        method: str,
        requests: Sequence[RequestT],
        response_type: type[ResponseT],
        run: Callable[[Statements, RequestT], ResponseT],
        *,
        kept_in: tuple[str, str] | None = None,
    ) -> list[ItemOutcome[ResponseT]]:
        """:meth:`idempotent` for each request, in order, all in one transaction.

        Each item runs in a savepoint: its domain error (a claim refused, ``run`` raising a
        :class:`ServiceError`) rolls back its own writes only and is its outcome; a repeat
        of a request id (of an earlier call or of this batch) replays the first response.
        Any other exception rolls the whole transaction back.
        """
        outcomes: list[ItemOutcome[ResponseT]] = []
        with self.transaction() as tx:
            for request in requests:
                tx.run("SAVEPOINT batch_item")
                try:
                    response, replayed = self._claimed_run(
                        tx,
                        method,
                        request,
                        response_type,
                        functools.partial(_run_item, run, request),
                        None,
                        kept_in,
                        None,
                    )
                except ServiceError as exc:
                    tx.run("ROLLBACK TO SAVEPOINT batch_item")
                    outcomes.append(ItemOutcome(error=exc))
                else:
                    outcomes.append(ItemOutcome(response, duplicate=replayed))
                tx.run("RELEASE SAVEPOINT batch_item")
        return outcomes

    def _claimed_run(
        self,
        tx: Statements,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        run: Callable[[Statements], ResponseT],
        request_id: str | None,
        kept_in: tuple[str, str] | None,
        recorded: Callable[[ResponseT], ResponseT] | None,
    ) -> tuple[ResponseT, bool]:
        """Claim, run and complete inside ``tx``: the response, and whether it is a replay."""
        key = idempotency.request_id_of(request) if request_id is None else request_id
        earlier = self.claim(tx, method, request, response_type, request_id=key, kept_in=kept_in)
        if earlier is not None:
            return earlier, True
        response = run(tx)
        self.complete(tx, method, key, response if recorded is None else recorded(response))
        return response, False

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

    # -- schema upkeep, for SQLite files an older version made ---------------------------

    def table_sql(self, table: str) -> str | None:
        """The ``CREATE TABLE`` statement ``table`` was made with, or ``None`` if absent.

        SQLite only: on PostgreSQL tables change by migrations alone (``None`` there).
        """
        if self.engine != "sqlite":
            return None
        row = self.one("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", [table])
        return None if row is None else str(row["sql"])

    def columns(self, table: str) -> list[str]:
        """The column names of ``table`` (empty if it does not exist)."""
        if isinstance(self._session, PostgresSession):
            rows = self.all(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?"
                " ORDER BY ordinal_position",
                [table],
            )
            return [str(row["column_name"]) for row in rows]
        return list(self._columns(self._sqlite, table))

    @property
    def _sqlite(self) -> sqlite3.Connection:
        if not isinstance(self._session, SqliteSession):
            raise StoreError("an in-place upgrade is for SQLite files only")
        return self._session.conn

    def rebuild(self, schema: str, tables: Mapping[str, Mapping[str, str]]) -> None:
        """Move each table's rows into a table ``schema`` makes anew, in one transaction.

        For changes SQLite cannot make in place (a ``CHECK`` listing values, a column's
        type). ``tables`` maps each table to its new columns' values, as SQL over the old
        columns; a new column not named there takes its default.
        """
        conn = self._sqlite
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
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA legacy_alter_table=ON")
        try:
            conn.executescript(script)  # leaves its transaction open, to check first
            broken = self.all("PRAGMA foreign_key_check")
            if broken:
                raise StoreError(
                    f"rebuilding {', '.join(tables)} would break {len(broken)} references"
                )
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA legacy_alter_table=OFF")
            conn.execute("PRAGMA foreign_keys=ON")

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
            old = self._columns(self._sqlite, table)
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
