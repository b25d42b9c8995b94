"""Merchants' webhook signing secrets, sealed at rest with AES-256-GCM under a key kept apart.

A signing secret must be usable to sign, so it cannot be hashed; sealing it means a copy of
the database (a backup, a replica) lets nobody sign webhooks without the key file as well.
Each sealed secret is bound to its merchant and id (associated data), so rows cannot be
swapped. A secret leaves this module only to sign, and once in RotateWebhookSecret's answer:
the response kept for AIP-155 replays has none.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.notification.v1 import notification_pb2 as pb
from services.notification import signing
from services.storage import idempotency
from services.storage.database import open_database, transaction

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS webhook_secrets (
    secret_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    create_time REAL NOT NULL,
    retire_time REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_secrets_current
    ON webhook_secrets (merchant_id) WHERE retire_time IS NULL;
"""
    + idempotency.SCHEMA
)
_INSERT = (
    "INSERT INTO webhook_secrets (secret_id, merchant_id, sealed, create_time) VALUES (?, ?, ?, ?)"
)
_INSERT_UNLESS_EXISTS = _INSERT + " ON CONFLICT DO NOTHING"
_SEALED_VERSION = b"\x01"


class SecretSealer:
    """AES-256-GCM with the service's sealing key; its repr never shows the key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretSealer(<key hidden>)"

    def seal(self, secret: str, context: str) -> bytes:
        """Version byte, random nonce and ciphertext of ``secret`` bound to ``context``."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, secret.encode(), context.encode())
        return _SEALED_VERSION + nonce + sealed

    def unseal(self, sealed: bytes, context: str) -> str:
        """The secret; RuntimeError if it was sealed with another key or for another row."""
        version, nonce, ciphertext = sealed[:1], sealed[1:13], sealed[13:]
        if version == _SEALED_VERSION:
            try:
                return self._aead.decrypt(nonce, ciphertext, context.encode()).decode()
            except InvalidTag:
                pass
        raise RuntimeError(
            "a webhook secret does not open with this sealing key "
            "(was NOTIFICATION_SERVICE_SECRETS_KEY_FILE replaced?)"
        )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _context(merchant_id: str, secret_id: str) -> str:
    return f"{merchant_id}/{secret_id}"


class WebhookSecretStore:
    """Each merchant's current signing secret and the previous one while it overlaps."""

    def __init__(
        self,
        path: Path | str,
        sealer: SecretSealer,
        *,
        clock: Callable[[], float] = time.time,
        new_secret: Callable[[], str] = signing.new_secret,
    ) -> None:
        self._conn = open_database(path, SCHEMA)
        self._sealer = sealer
        self._clock = clock
        self._new_secret = new_secret

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def signing_secrets(self, merchant_id: str) -> list[str]:
        """The secrets to sign with, current first; a merchant without one gets it now."""
        now = self._clock()
        rows = self._signing_rows(merchant_id, now)
        if not rows:
            with transaction(self._conn) as conn:
                # A concurrent first use may have made one: the unique index keeps that one.
                self._insert_current(conn, merchant_id, now, unless_exists=True)
            rows = self._signing_rows(merchant_id, now)
        return [
            self._sealer.unseal(row["sealed"], _context(merchant_id, row["secret_id"]))
            for row in rows
        ]

    def _signing_rows(self, merchant_id: str, now: float) -> list[sqlite3.Row]:
        return self._conn.execute(
            "SELECT secret_id, sealed FROM webhook_secrets WHERE merchant_id = ?"
            " AND (retire_time IS NULL OR retire_time > ?)"
            " ORDER BY retire_time IS NOT NULL, create_time DESC",
            (merchant_id, now),
        ).fetchall()

    def rotate(
        self, request: pb.RotateWebhookSecretRequest, *, overlap_s: float
    ) -> pb.RotateWebhookSecretResponse:
        """Make a new current secret; the previous one signs for ``overlap_s`` more seconds.

        Request ids are per merchant. A replay answers the first rotation's metadata without
        the secret. Older overlapping secrets retire at once: at most two ever sign.

        Raises:
            InvalidArgument: the request id was used with a different body.
        """
        now = self._clock()
        key = f"{request.merchant_id}/{request.request_id}"
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "RotateWebhookSecret", key, request)
            replay = idempotency.replayed(pb.RotateWebhookSecretResponse, claim)
            if replay is not None:
                return replay
            conn.execute(
                "DELETE FROM webhook_secrets WHERE merchant_id = ? AND retire_time IS NOT NULL",
                (request.merchant_id,),
            )
            previous = conn.execute(
                "UPDATE webhook_secrets SET retire_time = ? WHERE merchant_id = ?"
                " AND retire_time IS NULL",
                (now + overlap_s, request.merchant_id),
            ).rowcount
            secret_id, secret = self._insert_current(conn, request.merchant_id, now)
            response = pb.RotateWebhookSecretResponse(
                webhook_secret=pb.WebhookSecret(
                    secret_id=secret_id,
                    merchant_id=request.merchant_id,
                    create_time=_timestamp(now),
                )
            )
            if previous:
                response.previous_secret_expire_time.CopyFrom(_timestamp(now + overlap_s))
            idempotency.complete(conn, "RotateWebhookSecret", key, response)
        response.secret = secret
        return response

    def _insert_current(
        self, conn: sqlite3.Connection, merchant_id: str, now: float, *, unless_exists: bool = False
    ) -> tuple[str, str]:
        secret_id = f"whs_{uuid.uuid4().hex[:24]}"
        secret = self._new_secret()
        sealed = self._sealer.seal(secret, _context(merchant_id, secret_id))
        conn.execute(
            _INSERT_UNLESS_EXISTS if unless_exists else _INSERT,
            (secret_id, merchant_id, sealed, now),
        )
        return secret_id, secret
