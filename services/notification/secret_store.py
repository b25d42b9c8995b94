"""Merchants' webhook signing secrets, sealed at rest with AES-256-GCM under a key kept apart.

A signing secret must be usable to sign, so it cannot be hashed; sealing it means a copy of
the database (a backup, a replica) lets nobody sign webhooks without the key file as well.
Each sealed secret is bound to its merchant and id (associated data), so rows cannot be
swapped. A secret leaves this module only to sign, and once in RotateWebhookSecret's answer:
the response kept for AIP-155 replays has none.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from paymesh.notification.v1 import notification_pb2 as pb
from services.notification import signing
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, seconds_to_ns, timestamp

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS webhook_secrets (
    secret_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    create_time_ns INTEGER NOT NULL,
    retire_time_ns INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_secrets_current
    ON webhook_secrets (merchant_id) WHERE retire_time_ns IS NULL;
"""
    + idempotency.SCHEMA
)
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
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))
        self._sealer = sealer
        self._new_secret = new_secret

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def signing_secrets(self, merchant_id: str) -> list[str]:
        """The secrets to sign with, current first; a merchant without one gets it now."""
        now = self._db.clock_ns()
        rows = self._signing_rows(merchant_id, now)
        if not rows:
            with self._db.transaction() as tx:
                # A concurrent first use may have made one: the unique index keeps that one.
                self._insert_current(tx, merchant_id, now, unless_exists=True)
            rows = self._signing_rows(merchant_id, now)
        return [
            self._sealer.unseal(row["sealed"], _context(merchant_id, row["secret_id"]))
            for row in rows
        ]

    def _signing_rows(self, merchant_id: str, now: int) -> list[Row]:
        return self._db.all(
            "SELECT secret_id, sealed FROM webhook_secrets WHERE merchant_id = ?"
            " AND (retire_time_ns IS NULL OR retire_time_ns > ?)"
            " ORDER BY retire_time_ns IS NOT NULL, create_time_ns DESC",
            (merchant_id, now),
        )

    def rotate(
        self, request: pb.RotateWebhookSecretRequest, *, overlap_s: float
    ) -> pb.RotateWebhookSecretResponse:
        """Make a new current secret; the previous one signs for ``overlap_s`` more seconds.

        Request ids are per merchant. A replay answers the first rotation's metadata without
        the secret. Older overlapping secrets retire at once: at most two ever sign.

        Raises:
            InvalidArgument: the request id was used with a different body.
        """
        key = f"{request.merchant_id}/{request.request_id}"

        def run(tx: Statements) -> pb.RotateWebhookSecretResponse:
            now = self._db.clock_ns()
            retire = now + seconds_to_ns(overlap_s)
            tx.run(
                "DELETE FROM webhook_secrets WHERE merchant_id = ? AND retire_time_ns IS NOT NULL",
                (request.merchant_id,),
            )
            previous = tx.run(
                "UPDATE webhook_secrets SET retire_time_ns = ? WHERE merchant_id = ?"
                " AND retire_time_ns IS NULL",
                (retire, request.merchant_id),
            )
            secret_id, secret = self._insert_current(tx, request.merchant_id, now)
            response = pb.RotateWebhookSecretResponse(
                secret=secret,
                webhook_secret=pb.WebhookSecret(
                    secret_id=secret_id,
                    merchant_id=request.merchant_id,
                    create_time=timestamp(now),
                ),
            )
            if previous:
                response.previous_secret_expire_time.CopyFrom(timestamp(retire))
            return response

        def without_secret(
            rotated: pb.RotateWebhookSecretResponse,
        ) -> pb.RotateWebhookSecretResponse:
            kept = pb.RotateWebhookSecretResponse()
            kept.CopyFrom(rotated)
            kept.ClearField("secret")
            return kept

        return self._db.idempotent(
            "RotateWebhookSecret",
            request,
            pb.RotateWebhookSecretResponse,
            run,
            request_id=key,
            recorded=without_secret,
        )

    def _insert_current(
        self, tx: Statements, merchant_id: str, now: int, *, unless_exists: bool = False
    ) -> tuple[str, str]:
        secret_id = f"whs_{uuid.uuid4().hex[:24]}"
        secret = self._new_secret()
        sealed = self._sealer.seal(secret, _context(merchant_id, secret_id))
        tx.insert(
            "webhook_secrets",
            {
                "secret_id": secret_id,
                "merchant_id": merchant_id,
                "sealed": sealed,
                "create_time_ns": now,
            },
            unless_exists=unless_exists,
        )
        return secret_id, secret
