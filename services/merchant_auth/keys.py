"""API key secrets: how they are made, recognised, presented and stored (as peppered digests).

A secret reads ``sk_<lookup>_<body>``: the 16 hex digits of ``lookup`` are public (they make
the key id and the displayed prefix, so a key is found without scanning digests), the 43
characters of ``body`` carry 256 random bits and are never stored or shown again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

SECRET_PREFIX = "sk_"
KEY_ID_PREFIX = "key_"
#: Scheme tag of the current stored format, ``hmac-sha256$<digest base64>``.
HMAC_SCHEME = "hmac-sha256"
#: Scheme tag of rows written before HMAC: ``scrypt$n$r$p$<salt b64>$<digest b64>``.
LEGACY_SCRYPT_SCHEME = "scrypt"
MIN_PEPPER_BYTES = 32
_SECRET = re.compile(r"^sk_(?P<lookup>[0-9a-f]{16})_(?P<body>[A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """A freshly made key: its public parts and the secret the caller sees exactly once."""

    key_id: str
    """Server-assigned key id (``key_<lookup>``)."""
    prefix: str
    """Public beginning of the secret (``sk_<lookup>``), shown to tell keys apart."""
    secret: str = field(repr=False)
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


def bearer_secret(authorization: Sequence[str | bytes]) -> str | None:
    """The token of a call's single ``authorization`` value ``Bearer <token>``, else ``None``.

    ``None`` when the value is missing, repeated (which one would be meant is ambiguous),
    binary, of another scheme or empty. The scheme name is case-insensitive (RFC 6750).
    """
    if len(authorization) != 1 or not isinstance(authorization[0], str):
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """Whether a secret matched its stored form, and the form to store instead if outdated."""

    matches: bool
    """The secret is the key's."""
    upgraded_hash: str | None = field(default=None, repr=False)
    """The current-scheme digest to replace a legacy stored hash with, after a match."""


class SecretVerifier(Protocol):
    """Checks a presented secret against what the store holds for its key."""

    async def verify(self, secret: str, stored: str) -> Verification:
        """Whether ``secret`` matches ``stored``."""
        ...


@dataclass(frozen=True, slots=True)
class PepperedHasher:
    """HMAC-SHA256 of a secret under a server-side pepper; the stored form carries its scheme.

    The secret already carries 256 random bits, so a slow KDF would buy nothing but CPU an
    attacker can make us burn; the pepper (kept outside the database) makes a stolen database
    alone useless for checking guesses. Verification is microseconds and runs on the loop.
    """

    pepper: bytes = field(repr=False)
    """Server-side secret key of the HMAC, at least MIN_PEPPER_BYTES long."""

    def __post_init__(self) -> None:
        if len(self.pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"the pepper must be at least {MIN_PEPPER_BYTES} bytes")

    def digest(self, secret: str) -> str:
        """``hmac-sha256$<digest base64>`` of ``secret``."""
        return f"{HMAC_SCHEME}${_b64(self._mac(secret))}"

    def matches(self, secret: str, stored: str) -> bool:
        """Whether ``stored`` is this pepper's digest of ``secret``, compared in constant time."""
        scheme, _, encoded = stored.partition("$")
        if scheme != HMAC_SCHEME:
            return False
        try:
            expected = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(self._mac(secret), expected)

    def _mac(self, secret: str) -> bytes:
        return hmac.new(self.pepper, secret.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class KeyVerifier:
    """Verifies against the current HMAC digests and, once, against legacy scrypt hashes.

    A legacy row (from before HMAC) is checked with scrypt in a worker thread, since it costs
    tens of milliseconds of CPU by design; on a match the caller gets the HMAC digest to store
    in its place, so each legacy key pays scrypt once. An unknown scheme never matches.
    """

    hasher: PepperedHasher
    """The current scheme."""

    async def verify(self, secret: str, stored: str) -> Verification:
        """Whether ``secret`` matches ``stored``, and its HMAC digest if ``stored`` is legacy."""
        scheme = stored.partition("$")[0]
        if scheme == HMAC_SCHEME:
            return Verification(matches=self.hasher.matches(secret, stored))
        if scheme == LEGACY_SCRYPT_SCHEME and await asyncio.to_thread(
            legacy_scrypt_matches, secret, stored
        ):
            return Verification(matches=True, upgraded_hash=self.hasher.digest(secret))
        return Verification(matches=False)


def legacy_scrypt_matches(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a legacy ``scrypt$n$r$p$salt$digest``, in constant time.

    Blocking and CPU-bound: call it from a worker thread.
    """
    try:
        scheme, n_text, r_text, p_text, salt, digest = stored.split("$")
        expected = base64.b64decode(digest, validate=True)
        salt_bytes = base64.b64decode(salt, validate=True)
        cost = (int(n_text), int(r_text), int(p_text))
    except (binascii.Error, ValueError):
        return False
    if scheme != LEGACY_SCRYPT_SCHEME:
        return False
    n, r, p = cost
    try:
        # maxmem above the 128*n*r bytes scrypt needs; OpenSSL's 32 MiB default is too tight.
        actual = hashlib.scrypt(
            secret.encode(), salt=salt_bytes, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=32
        )
    except (ValueError, OverflowError):  # parameters OpenSSL refuses: nothing can match them
        return False
    return hmac.compare_digest(actual, expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
