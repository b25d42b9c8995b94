"""API keys verified recently, shared by merchant-auth's replicas in Redis (``REDIS_URL``).

An entry per key id holds the peppered HMAC digest of the secret that was verified (the form
the database stores; never the secret), its merchant and that it was active. A call whose
secret has that digest skips the database read and the verification; anything else takes
the full path. Revoking a key deletes its entry at once; entries also expire after ``ttl_s``.
"""

from __future__ import annotations

import logging

from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from services.merchant_auth.keys import PepperedHasher
from services.merchant_auth.store import Credential
from services.storage.shared_state import SharedCache

log = logging.getLogger("paymesh.merchant_auth")


class VerifiedKeys:
    """Key id -> the digest of its verified secret and its owner, for ``ttl_s`` seconds."""

    def __init__(self, cache: SharedCache, hasher: PepperedHasher, *, ttl_s: float) -> None:
        self._cache = cache
        self._hasher = hasher
        self._ttl_s = ttl_s

    async def credential(self, key_id: str, secret: str) -> Credential | None:
        """The active key's credential if ``secret`` is the one verified for it, else None."""
        found = await self._cache.get(key_id)
        if found is None:
            return None
        entry = found[0]
        digest, merchant_id = entry.get("digest"), entry.get("merchant_id")
        if not isinstance(digest, str) or not isinstance(merchant_id, str):
            return None
        if not self._hasher.matches(secret, digest):  # constant time, like the database path
            return None
        return Credential(
            key_id=key_id,
            merchant_id=merchant_id,
            status=pb.API_KEY_STATUS_ACTIVE,
            secret_hash=digest,
        )

    async def remember(self, credential: Credential, secret: str) -> None:
        """``secret`` was just verified as ``credential``'s; only active keys are kept."""
        if credential.status != pb.API_KEY_STATUS_ACTIVE:
            return
        entry = {"digest": self._hasher.digest(secret), "merchant_id": credential.merchant_id}
        await self._cache.put(credential.key_id, entry, ttl_s=self._ttl_s)

    async def forget(self, key_id: str) -> None:
        """The key was revoked: no replica may answer from a verified entry of it again."""
        if not await self._cache.drop(key_id):
            log.warning(
                "redis unreachable while revoking %s: a replica may accept it from its verified"
                " entry for up to %.0f s",
                key_id,
                self._ttl_s,
            )
