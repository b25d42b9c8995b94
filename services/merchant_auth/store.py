"""merchant-auth-service's data: API key metadata and peppered digests, never a secret."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from services.merchant_auth.keys import NewKey
from services.mesh.errors import NotFound
from services.storage import idempotency
from services.storage.database import open_database, transaction

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    prefix TEXT NOT NULL,
    label TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    status INTEGER NOT NULL,
    revoke_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    revoke_time_ns INTEGER,
    issue_request_id TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS api_keys_by_merchant ON api_keys (merchant_id, create_time_ns, key_id);
"""
    + idempotency.SCHEMA
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """What authentication needs of a key: its owner, state and stored hash."""

    key_id: str
    """The key's id."""
    merchant_id: str
    """Merchant the key belongs to."""
    status: int
    """ApiKeyStatus value."""
    secret_hash: str
    """The stored digest the presented secret must match (``<scheme>$...``)."""


def _timestamp(nanoseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    return stamp


def _api_key(row: sqlite3.Row) -> pb.ApiKey:
    key = pb.ApiKey(
        key_id=row["key_id"],
        merchant_id=row["merchant_id"],
        prefix=row["prefix"],
        label=row["label"],
        status=row["status"],
        create_time=_timestamp(row["create_time_ns"]),
    )
    if row["revoke_time_ns"] is not None:
        key.revoke_time.CopyFrom(_timestamp(row["revoke_time_ns"]))
    return key


class ApiKeyStore:
    """API keys in SQLite; writes are idempotent by request id, secrets exist only as digests."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._conn = open_database(path, SCHEMA)
        self._clock_ns = clock_ns

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def issued_by(self, request_id: str) -> bool:
        """Whether a key was already issued for this IssueApiKey request id."""
        row = self._conn.execute(
            "SELECT 1 FROM api_keys WHERE issue_request_id = ?", (request_id,)
        ).fetchone()
        return row is not None

    def issue(
        self, request: pb.IssueApiKeyRequest, key: NewKey, secret_hash: str
    ) -> pb.IssueApiKeyResponse:
        """Store the new key; a replayed request gets the first key's metadata, no secret.

        Only the secret-less response is kept for replays, so the secret leaves this
        process once, in the value returned here.
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "IssueApiKey", request.request_id, request)
            replay = idempotency.replayed(pb.IssueApiKeyResponse, claim)
            if replay is not None:
                return replay
            idempotency.refuse_if_kept(conn, "api_keys", "issue_request_id", request.request_id)
            conn.execute(
                "INSERT INTO api_keys (key_id, merchant_id, prefix, label, secret_hash, status,"
                " create_time_ns, issue_request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    request.merchant_id,
                    key.prefix,
                    request.label,
                    secret_hash,
                    pb.API_KEY_STATUS_ACTIVE,
                    self._clock_ns(),
                    request.request_id,
                ),
            )
            metadata = _api_key(self._require(key.key_id))
            idempotency.complete(
                conn, "IssueApiKey", request.request_id, pb.IssueApiKeyResponse(api_key=metadata)
            )
            return pb.IssueApiKeyResponse(api_key=metadata, secret=key.secret)

    def revoke(self, request: pb.RevokeApiKeyRequest) -> pb.ApiKey:
        """Revoke the key; revoking a revoked key keeps its first revocation."""
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "RevokeApiKey", request.request_id, request)
            replay = idempotency.replayed(pb.RevokeApiKeyResponse, claim)
            if replay is not None:
                return replay.api_key
            current = self._require(request.key_id)
            if current["status"] != pb.API_KEY_STATUS_REVOKED:
                conn.execute(
                    "UPDATE api_keys SET status=?, revoke_reason=?, revoke_time_ns=?"
                    " WHERE key_id=?",
                    (pb.API_KEY_STATUS_REVOKED, request.reason, self._clock_ns(), request.key_id),
                )
            key = _api_key(self._require(request.key_id))
            idempotency.complete(
                conn, "RevokeApiKey", request.request_id, pb.RevokeApiKeyResponse(api_key=key)
            )
            return key

    def credential(self, key_id: str) -> Credential | None:
        """The key's owner, state and hash, or ``None`` if no such key exists."""
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT key_id, merchant_id, status, secret_hash FROM api_keys WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            return None
        return Credential(
            key_id=row["key_id"],
            merchant_id=row["merchant_id"],
            status=row["status"],
            secret_hash=row["secret_hash"],
        )

    def replace_hash(self, key_id: str, *, old: str, new: str) -> bool:
        """Store ``new`` as the key's digest if it still is ``old``; whether it was replaced.

        The comparison keeps a concurrent change (another upgrade, a re-key) from being
        overwritten with a digest derived from a superseded state.
        """
        with transaction(self._conn) as conn:
            cursor = conn.execute(
                "UPDATE api_keys SET secret_hash = ? WHERE key_id = ? AND secret_hash = ?",
                (new, key_id, old),
            )
            return cursor.rowcount == 1

    def list(
        self, *, merchant_id: str, before: tuple[int, str] | None, limit: int
    ) -> list[pb.ApiKey]:
        """A merchant's keys newest first, starting below the ``(create_time_ns, id)`` cursor."""
        clauses = ["merchant_id = ?"]
        params: list[object] = [merchant_id]
        if before is not None:
            clauses.append("(create_time_ns, key_id) < (?, ?)")
            params.extend(before)
        rows = self._conn.execute(
            f"SELECT * FROM api_keys WHERE {' AND '.join(clauses)}"
            " ORDER BY create_time_ns DESC, key_id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_api_key(row) for row in rows]

    def _require(self, key_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = self._conn.execute(
            "SELECT * FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"API key {key_id!r} does not exist", metadata={"key_id": key_id})
        return row
