"""API key secrets: how they are made, recognised and stored (only as salted scrypt hashes).

A secret reads ``sk_<lookup>_<body>``: the 16 hex digits of ``lookup`` are public (they make
the key id and the displayed prefix, so a key is found without scanning hashes), the 43
characters of ``body`` carry 256 random bits and are never stored or shown again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

SECRET_PREFIX = "sk_"
KEY_ID_PREFIX = "key_"
_SECRET = re.compile(r"^sk_(?P<lookup>[0-9a-f]{16})_(?P<body>[A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """A freshly made key: its public parts and the secret the caller sees exactly once."""

    key_id: str
    """Server-assigned key id (``key_<lookup>``)."""
    prefix: str
    """Public beginning of the secret (``sk_<lookup>``), shown to tell keys apart."""
    secret: str
    """The full secret."""


def new_key(*, token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> NewKey:
    """A new key with a random 64-bit lookup id and a 256-bit random body."""
    lookup = token_bytes(8).hex()
    body = base64.urlsafe_b64encode(token_bytes(32)).decode().rstrip("=")
    return NewKey(
        key_id=f"{KEY_ID_PREFIX}{lookup}",
        prefix=f"{SECRET_PREFIX}{lookup}",
        secret=f"{SECRET_PREFIX}{lookup}_{body}",
    )


def key_id_of(secret: str) -> str | None:
    """The key id a secret claims to belong to, or ``None`` if it is not shaped like one."""
    match = _SECRET.match(secret)
    return f"{KEY_ID_PREFIX}{match['lookup']}" if match else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScryptHasher:
    """Salted scrypt of a secret; the parameters travel with each hash so they can be raised.

    The body already carries 256 random bits, so the work factor is defence in depth for a
    stolen database, not the main protection; the default costs about 30 ms of one core and
    runs off the event loop.
    """

    n: int = 2**14
    """CPU/memory cost (a power of two)."""
    r: int = 8
    """Block size."""
    p: int = 1
    """Parallelism."""
    salt_bytes: int = 16
    """Length of the per-key random salt."""

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two above 1, got {self.n}")
        if self.r < 1 or self.p < 1 or self.salt_bytes < 16:
            raise ValueError("scrypt r and p must be positive and the salt at least 16 bytes")

    def hash(self, secret: str) -> str:
        """``scrypt$n$r$p$salt$digest`` (base64) of ``secret`` with a fresh salt."""
        salt = secrets.token_bytes(self.salt_bytes)
        digest = _scrypt(secret, salt, self.n, self.r, self.p)
        return "$".join(("scrypt", str(self.n), str(self.r), str(self.p), _b64(salt), _b64(digest)))

    def verify(self, secret: str, stored: str) -> bool:
        """Whether ``secret`` matches ``stored``, compared in constant time."""
        try:
            scheme, n, r, p, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            salt_bytes = base64.b64decode(salt)
            cost = (int(n), int(r), int(p))
        except ValueError:
            return False
        if scheme != "scrypt":
            return False
        return hmac.compare_digest(_scrypt(secret, salt_bytes, *cost), expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem above the 128*n*r bytes scrypt needs; OpenSSL's 32 MiB default is too tight.
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=32
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class VerifiedSecrets:
    """Secrets that passed scrypt recently, remembered in memory as SHA-256 digests.

    scrypt is slow on purpose (it protects the stored hashes), and every payment is
    authenticated: verifying each one again would make key checks the mesh's bottleneck.
    A secret seen valid within ``ttl_s`` is checked against its digest in constant time;
    the entry is tied to the stored hash, so a re-keyed or removed key is never matched.
    Only this process's memory holds the digests; the database still holds scrypt only.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()

    def known_good(self, key_id: str, secret: str, stored_hash: str) -> bool:
        """Whether ``secret`` was verified against ``stored_hash`` within the TTL."""
        entry = self._entries.get(key_id)
        if entry is None:
            return False
        digest, verified_hash, expires = entry
        if verified_hash != stored_hash or self._clock() >= expires:
            del self._entries[key_id]
            return False
        return hmac.compare_digest(digest, hashlib.sha256(secret.encode()).digest())

    def remember(self, key_id: str, secret: str, stored_hash: str) -> None:
        """Record that ``secret`` just passed scrypt against ``stored_hash``."""
        self._entries[key_id] = (
            hashlib.sha256(secret.encode()).digest(),
            stored_hash,
            self._clock() + self._ttl_s,
        )
        self._entries.move_to_end(key_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
