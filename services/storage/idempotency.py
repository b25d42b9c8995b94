"""AIP-155 request ids, claimed atomically with the first write and replayed afterwards.

A mutating RPC claims its ``request_id`` in the same transaction as its first write
(a unique key, not luck): the same id with the same body replays the stored response; with
a different body it is INVALID_ARGUMENT; while the first execution is still running, a
duplicate gets ABORTED (retryable with the same id). A finished record is kept for the
:class:`Retention` period (``PAYMESH_IDEMPOTENCY_RETENTION_S``, 7 days by default); after
that the id is new again, and claims purge such records at most once per purge interval.
Stores do not call this module: :meth:`services.storage.sql.Database.idempotent` (one write)
and :class:`services.storage.resumable.StepStore` (multi-step work) do.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from interceptors.errors import Reason
from services.mesh.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument
from services.mesh.validation import quote

if TYPE_CHECKING:
    from services.storage.sql import Statements

#: Overrides :attr:`Retention.retention_s` (seconds, at least :data:`MIN_RETENTION_S`).
RETENTION_VAR = "PAYMESH_IDEMPOTENCY_RETENTION_S"
DEFAULT_RETENTION_S = 7 * 24 * 3600.0
#: Retries come within minutes, but a late one must still replay: never forget within a day.
MIN_RETENTION_S = 24 * 3600.0

#: The name of this module's tables in ``schema_migrations``; the store base migrates them
#: into every database it opens.
COMPONENT = "idempotency"
SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    response BLOB,
    create_time_ns INTEGER NOT NULL,
    PRIMARY KEY (method, request_id)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_done_by_age
    ON idempotency_keys (create_time_ns) WHERE state = 'done';
CREATE TABLE IF NOT EXISTS idempotency_purge (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    purge_time_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long finished request ids are remembered, and how often claims purge the rest.

    Only ``done`` records expire: an ``in_flight`` one is work a recovery pass still owns.
    """

    retention_s: float = DEFAULT_RETENTION_S
    """Age (from the first claim) after which a finished record is forgotten."""
    purge_interval_s: float = 600.0
    """Least time between two purges of one database."""
    purge_batch: int = 1000
    """Most records one purge deletes, so a claim never waits on a huge delete; a full batch
    lets the next claim purge again."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.retention_s) and self.retention_s >= MIN_RETENTION_S):
            raise ValueError(
                f"retention_s must be at least {MIN_RETENTION_S:.0f} s, got {self.retention_s}"
            )
        if not (math.isfinite(self.purge_interval_s) and self.purge_interval_s >= 0):
            raise ValueError(f"purge_interval_s must be >= 0, got {self.purge_interval_s}")
        if self.purge_batch < 1:
            raise ValueError(f"purge_batch must be positive, got {self.purge_batch}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Retention:
        """The retention ``PAYMESH_IDEMPOTENCY_RETENTION_S`` sets, else the default.

        Raises:
            ValueError: the variable is not a number of seconds of at least a day.
        """
        text = environ.get(RETENTION_VAR, "").strip()
        if not text:
            return cls()
        try:
            return cls(retention_s=float(text))
        except ValueError:
            raise ValueError(
                f"{RETENTION_VAR}={text!r} is not a number of seconds of at least"
                f" {MIN_RETENTION_S:.0f} (a day; default {DEFAULT_RETENTION_S:.0f})"
            ) from None


@functools.lru_cache(maxsize=4)
def _retention_of(text: str | None) -> Retention:
    return Retention.from_environ({} if text is None else {RETENTION_VAR: text})


def default_retention() -> Retention:
    """The retention of this process (from ``os.environ``)."""
    return _retention_of(os.environ.get(RETENTION_VAR))


def fingerprint(request: Message) -> str:
    """A digest of the request without its ``request_id``: what "the same body" means."""
    body = type(request)()
    body.CopyFrom(request)
    if "request_id" in body.DESCRIPTOR.fields_by_name:
        body.ClearField("request_id")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def request_id_of(request: Message) -> str:
    """The ``request_id`` of a mutating request (AIP-155: every one has that field)."""
    field = request.DESCRIPTOR.fields_by_name["request_id"]
    return str(getattr(request, field.name))


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a request id."""

    replay: bytes | None
    """The stored response of an earlier identical request, or ``None`` if we now own it."""


def claim(
    conn: Statements,
    method: str,
    request_id: str,
    request: Message,
    *,
    now_ns: int | None = None,
    retention: Retention | None = None,
) -> Claim:
    """Claim ``request_id`` for ``method`` inside the caller's open transaction.

    A finished record older than the retention counts as absent: the request is new.

    Args:
        now_ns: the store's clock (nanoseconds since the epoch); ``time.time_ns()`` if not
            given.
        retention: defaults to :func:`default_retention`.

    Raises:
        InvalidArgument: the id was used with a different body.
        Aborted: an identical request is still executing.
    """
    now = time.time_ns() if now_ns is None else now_ns
    retention = retention or default_retention()
    purge_expired(conn, now_ns=now, retention=retention)
    digest = fingerprint(request)
    row = conn.one(
        "SELECT fingerprint, state, response, create_time_ns FROM idempotency_keys"
        " WHERE method=? AND request_id=?",
        (method, request_id),
    )
    if row is not None and row["state"] == "done" and _expired(row, now, retention):
        conn.run(
            "DELETE FROM idempotency_keys WHERE method=? AND request_id=?", (method, request_id)
        )
        row = None
    if row is None:
        # INSERT ... ON CONFLICT: the write lock already orders claims, and the unique key
        # alone would keep a claim made past it from running twice (it is in flight then).
        claimed = conn.insert(
            "idempotency_keys",
            {
                "method": method,
                "request_id": request_id,
                "fingerprint": digest,
                "state": "in_flight",
                "create_time_ns": now,
            },
            unless_exists=True,
        )
        if claimed:
            return Claim(replay=None)
        raise _in_flight(request_id)
    if row["fingerprint"] != digest:
        raise InvalidArgument(
            f"request_id {quote(request_id)} was already used with a different request body",
            reason=Reason.IDEMPOTENCY_KEY_REUSED,
            field_violations=[FieldViolation("request_id", "reused with a different body")],
        )
    if row["state"] != "done":
        raise _in_flight(request_id)
    return Claim(replay=bytes(row["response"]))


def _in_flight(request_id: str) -> Aborted:
    return Aborted(
        f"the first request with request_id {quote(request_id)} is still in flight; retry later",
        reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
    )


def refuse_if_kept(conn: Statements, table: str, column: str, request_id: str) -> None:
    """Refuse a new claim of an id that a row of ``table`` still carries in ``column``.

    A store whose rows keep their request id (a UNIQUE column) calls this after a new
    claim: the record expired, but the work it made is still there, so the request cannot
    run again under that id. ``table`` and ``column`` are the store's constants.

    Raises:
        AlreadyExists: a row carries the id; the caller must send a new request_id.
    """
    kept = conn.one(f"SELECT 1 FROM {table} WHERE {column} = ? LIMIT 1", (request_id,))
    if kept is not None:
        raise AlreadyExists(
            f"request_id {quote(request_id)} was used longer ago than its retention and its"
            " result is kept; send a new request_id",
            metadata={"request_id": request_id},
        )


def _retention_ns(retention: Retention) -> int:
    return round(retention.retention_s * 1e9)


def _expired(row: Any, now_ns: int, retention: Retention) -> bool:
    return int(row["create_time_ns"]) < now_ns - _retention_ns(retention)


def purge_expired(
    conn: Statements, *, now_ns: int, retention: Retention, force: bool = False
) -> int:
    """Delete finished records past the retention, unless a purge ran within the interval.

    Runs inside the caller's open transaction; returns how many records it deleted.
    ``force`` purges whatever the interval (a periodic task's hook).
    """
    last = conn.one("SELECT purge_time_ns FROM idempotency_purge WHERE id = 0")
    interval_ns = round(retention.purge_interval_s * 1e9)
    # A clock that went back (now < purge time) also purges, so it cannot stall purging.
    if not force and last is not None and 0 <= now_ns - last["purge_time_ns"] < interval_ns:
        return 0
    deleted = conn.run(
        # By primary key, not SQLite's rowid: the same text runs on PostgreSQL.
        "DELETE FROM idempotency_keys WHERE (method, request_id) IN (SELECT method, request_id"
        " FROM idempotency_keys WHERE state = 'done' AND create_time_ns < ? LIMIT ?)",
        (now_ns - _retention_ns(retention), retention.purge_batch),
    )
    if deleted < retention.purge_batch:  # a full batch leaves more: purge again next claim
        conn.upsert("idempotency_purge", {"id": 0, "purge_time_ns": now_ns}, key=["id"])
    return deleted


def complete(conn: Statements, method: str, request_id: str, response: Message) -> None:
    """Store the response of a claimed request id inside the caller's open transaction."""
    conn.run(
        "UPDATE idempotency_keys SET state='done', response=? WHERE method=? AND request_id=?",
        (response.SerializeToString(deterministic=True), method, request_id),
    )


def release(conn: Statements, method: str, request_id: str) -> None:
    """Forget an in-flight claim whose execution failed before any effect, so a retry may run."""
    conn.run(
        "DELETE FROM idempotency_keys WHERE method=? AND request_id=? AND state='in_flight'",
        (method, request_id),
    )
