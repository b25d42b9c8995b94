"""Webhook signatures: ``PayMesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The key is the merchant's whole secret (``whsec_...``) as UTF-8 and the message is
``"<t>.<raw body>"``, so neither the body nor the time can change without the signature
failing. While a previous secret overlaps a new one the header carries one ``v1=`` per
secret; a receiver accepts a request if any of them matches its secret. :func:`verify` is the
receiver's side, the very function the README shows merchants.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence

HEADER = "PayMesh-Signature"
SECRET_PREFIX = "whsec_"
#: Oldest (and furthest in the future) a signature's time may be, in seconds from now.
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """A webhook's signature header is malformed, too old, or matches no signature."""


def new_secret(*, token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh signing secret: ``whsec_`` and 256 random bits, URL-safe base64."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(token_bytes(32)).decode().rstrip("=")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` keyed with ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(signing_secrets: Sequence[str], body: bytes, timestamp: int) -> str:
    """The header value: the time, then one ``v1=`` per secret (the current one first)."""
    if not signing_secrets:
        raise ValueError("a webhook is signed with at least one secret")
    signatures = [f"v1={sign(secret, body, timestamp)}" for secret in signing_secrets]
    return ",".join([f"t={timestamp}", *signatures])


def verify(
    secret: str, header: str, body: bytes, now: float, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> None:
    """Check a received webhook: its raw ``body`` and ``header`` against ``secret`` at ``now``.

    Raises:
        SignatureError: the header is malformed, its time is more than ``tolerance_s`` from
            ``now`` (a replay, or a badly wrong clock), or no ``v1`` signature matches.
    """
    pairs = [item.strip().partition("=") for item in header.split(",")]
    stamps = [value for key, _, value in pairs if key == "t"]
    candidates = [value for key, _, value in pairs if key == "v1"]
    if len(stamps) != 1 or not re.fullmatch(r"[0-9]{1,12}", stamps[0]) or not candidates:
        raise SignatureError(f"{HEADER} is not t=<unix seconds>,v1=<hex>")
    if abs(now - int(stamps[0])) > tolerance_s:
        raise SignatureError(
            f"signed more than {tolerance_s} s from now: a replay or a wrong clock"
        )
    expected = hmac.new(secret.encode(), f"{stamps[0]}.".encode() + body, hashlib.sha256)
    if not any(hmac.compare_digest(expected.hexdigest().encode(), c.encode()) for c in candidates):
        raise SignatureError("no v1 signature matches the secret")
