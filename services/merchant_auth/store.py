"""merchant-auth-service's data: API key metadata and peppered digests, never a secret."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from services.merchant_auth.keys import NewKey
from services.mesh.errors import NotFound
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, timestamp

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


def _api_key(row: Row) -> pb.ApiKey:
    key = pb.ApiKey(
        key_id=row["key_id"],
        merchant_id=row["merchant_id"],
        prefix=row["prefix"],
        label=row["label"],
        status=row["status"],
        create_time=timestamp(row["create_time_ns"]),
    )
    if row["revoke_time_ns"] is not None:
        key.revoke_time.CopyFrom(timestamp(row["revoke_time_ns"]))
    return key


class ApiKeyStore:
    """API keys; writes are idempotent by request id, secrets exist only as digests."""

    def __init__(self, path: Path | str, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._db = Database(path, SCHEMA, clock_ns=clock_ns)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def issued_by(self, request_id: str) -> bool:
        """Whether a key was already issued for this IssueApiKey request id."""
        row = self._db.one("SELECT 1 FROM api_keys WHERE issue_request_id = ?", (request_id,))
        return row is not None

    def issue(
        self, request: pb.IssueApiKeyRequest, key: NewKey, secret_hash: str
    ) -> pb.IssueApiKeyResponse:
        """Store the new key; a replayed request gets the first key's metadata, no secret.

        Only the secret-less response is kept for replays, so the secret leaves this
        process once, in the value returned here.
        """

        def run(tx: Statements) -> pb.IssueApiKeyResponse:
            tx.insert(
                "api_keys",
                {
                    "key_id": key.key_id,
                    "merchant_id": request.merchant_id,
                    "prefix": key.prefix,
                    "label": request.label,
                    "secret_hash": secret_hash,
                    "status": pb.API_KEY_STATUS_ACTIVE,
                    "create_time_ns": self._db.clock_ns(),
                    "issue_request_id": request.request_id,
                },
            )
            metadata = _api_key(self._require(key.key_id))
            return pb.IssueApiKeyResponse(api_key=metadata, secret=key.secret)

        return self._db.idempotent(
            "IssueApiKey",
            request,
            pb.IssueApiKeyResponse,
            run,
            kept_in=("api_keys", "issue_request_id"),
            recorded=lambda issued: pb.IssueApiKeyResponse(api_key=issued.api_key),
        )

    def revoke(self, request: pb.RevokeApiKeyRequest) -> pb.ApiKey:
        """Revoke the key; revoking a revoked key keeps its first revocation."""

        def run(tx: Statements) -> pb.RevokeApiKeyResponse:
            current = self._require(request.key_id)
            if current["status"] != pb.API_KEY_STATUS_REVOKED:
                tx.update(
                    "api_keys",
                    {
                        "status": pb.API_KEY_STATUS_REVOKED,
                        "revoke_reason": request.reason,
                        "revoke_time_ns": self._db.clock_ns(),
                    },
                    key_id=request.key_id,
                )
            return pb.RevokeApiKeyResponse(api_key=_api_key(self._require(request.key_id)))

        return self._db.idempotent("RevokeApiKey", request, pb.RevokeApiKeyResponse, run).api_key

    def credential(self, key_id: str) -> Credential | None:
        """The key's owner, state and hash, or ``None`` if no such key exists."""
        row = self._db.one(
            "SELECT key_id, merchant_id, status, secret_hash FROM api_keys WHERE key_id = ?",
            (key_id,),
        )
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
        with self._db.transaction() as tx:
            changed = tx.run(
                "UPDATE api_keys SET secret_hash = ? WHERE key_id = ? AND secret_hash = ?",
                (new, key_id, old),
            )
            return changed == 1

    def list(
        self, *, merchant_id: str, before: tuple[int, str] | None, limit: int
    ) -> list[pb.ApiKey]:
        """A merchant's keys newest first, starting below the ``(create_time_ns, id)`` cursor."""
        rows = self._db.page(
            "api_keys",
            order=("create_time_ns", "key_id"),
            cursor=before,
            limit=limit,
            where={"merchant_id": merchant_id},
        )
        return [_api_key(row) for row in rows]

    def _require(self, key_id: str) -> Row:
        row = self._db.one("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        if row is None:
            raise NotFound(f"API key {key_id!r} does not exist", metadata={"key_id": key_id})
        return row
