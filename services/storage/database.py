"""SQLite storage shared by the services' stores: open with the schema, one write transaction.

Each service owns one file (``var/<service>.db`` by default). Handlers run on one event
loop per process, so a store's methods run one at a time; ``BEGIN IMMEDIATE`` still makes
each write atomic on disk and unique constraints make idempotency keys race-free.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def open_database(path: Path | str, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` and apply ``schema``."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def is_unique_violation(exc: sqlite3.IntegrityError) -> bool:
    """Whether an IntegrityError is a UNIQUE/PRIMARY KEY conflict (an idempotent replay)."""
    return "UNIQUE constraint failed" in str(exc)
