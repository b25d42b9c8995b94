"""AIP-155 request ids, claimed atomically with the first write and replayed afterwards.

A mutating RPC claims its ``request_id`` in the same SQLite transaction as its first write
(a unique key, not luck): the same id with the same body replays the stored response; with
a different body it is INVALID_ARGUMENT; while the first execution is still running, a
duplicate gets ABORTED (retryable with the same id).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from interceptors.errors import Aborted, FieldViolation, InvalidArgument

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    response BLOB,
    created_at REAL NOT NULL,
    PRIMARY KEY (method, request_id)
);
"""

ResponseT = TypeVar("ResponseT", bound=Message)


def fingerprint(request: Message) -> str:
    """A digest of the request without its ``request_id``: what "the same body" means."""
    body = type(request)()
    body.CopyFrom(request)
    if "request_id" in body.DESCRIPTOR.fields_by_name:
        body.ClearField("request_id")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a request id."""

    replay: bytes | None
    """The stored response of an earlier identical request, or ``None`` if we now own it."""


def claim(conn: sqlite3.Connection, method: str, request_id: str, request: Message) -> Claim:
    """Claim ``request_id`` for ``method`` inside the caller's open transaction.

    Raises:
        InvalidArgument: the id was used with a different body.
        Aborted: an identical request is still executing.
    """
    digest = fingerprint(request)
    row = conn.execute(
        "SELECT fingerprint, state, response FROM idempotency_keys WHERE method=? AND request_id=?",
        (method, request_id),
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO idempotency_keys (method, request_id, fingerprint, state, created_at)"
            " VALUES (?, ?, ?, 'in_flight', ?)",
            (method, request_id, digest, time.time()),
        )
        return Claim(replay=None)
    if row["fingerprint"] != digest:
        raise InvalidArgument(
            f"request_id {request_id!r} was already used with a different request body",
            reason="IDEMPOTENCY_KEY_REUSED",
            field_violations=[FieldViolation("request_id", "reused with a different body")],
        )
    if row["state"] != "done":
        raise Aborted(
            f"the first request with request_id {request_id!r} is still in flight; retry later",
            reason="IDEMPOTENCY_KEY_IN_FLIGHT",
        )
    return Claim(replay=bytes(row["response"]))


def complete(conn: sqlite3.Connection, method: str, request_id: str, response: Message) -> None:
    """Store the response of a claimed request id inside the caller's open transaction."""
    conn.execute(
        "UPDATE idempotency_keys SET state='done', response=? WHERE method=? AND request_id=?",
        (response.SerializeToString(deterministic=True), method, request_id),
    )


def release(conn: sqlite3.Connection, method: str, request_id: str) -> None:
    """Forget an in-flight claim whose execution failed before any effect, so a retry may run."""
    conn.execute(
        "DELETE FROM idempotency_keys WHERE method=? AND request_id=? AND state='in_flight'",
        (method, request_id),
    )


def replayed(response_type: type[ResponseT], claim_: Claim) -> ResponseT | None:
    """The stored response parsed as ``response_type``, if the claim is a replay."""
    if claim_.replay is None:
        return None
    return response_type.FromString(claim_.replay)
