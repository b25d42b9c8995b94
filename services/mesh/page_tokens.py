"""Opaque page tokens: a flat position signed with HMAC-SHA256, bound to the List's filters.

A token is ``base64url(payload).base64url(mac)``; the payload is a flat JSON object of the
position's scalars plus a fingerprint of the filters. Decoding checks the length first, then
the MAC, and parses JSON only once the MAC proves the payload is ours, so a caller can neither
forge a position nor make the parser do unbounded work.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Names a file holding the key (at least :data:`MIN_KEY_BYTES` bytes, surrounding whitespace
#: ignored); every process that should accept another's tokens must read the same key.
KEY_FILE_VAR = "PAYMESH_PAGE_TOKEN_KEY_FILE"
#: Without :data:`KEY_FILE_VAR`, the key is generated once here under ``PAYMESH_VAR_DIR``.
GENERATED_KEY_NAME = "page-token.key"
MIN_KEY_BYTES = 32
#: Longest token accepted; checked before anything is decoded. Our longest position (an
#: account id and a currency) makes tokens of about 250 characters.
MAX_TOKEN_LENGTH = 512
#: Key of the filter fingerprint inside the payload; no position field may use it.
FILTERS_KEY = "_f"
_MAC_DOMAIN = b"paymesh.page-token.v1\x00"
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+$")

#: One value of a position.
Scalar = int | float | str


class PageTokenInvalid(ValueError):
    """A token this codec did not issue for these filters; the message says why, quoting none
    of it."""


class PageTokenKeyError(RuntimeError):
    """The key file is missing, unreadable or too short; the message names the file."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    if not _BASE64URL.match(text):
        raise PageTokenInvalid("is not a page token this service issued")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise PageTokenInvalid("is not a page token this service issued") from exc


def filters_fingerprint(filters: Mapping[str, Any]) -> str:
    """A short digest of a List request's filters (what a token is bound to)."""
    canonical = json.dumps(dict(filters), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return _b64encode(hashlib.sha256(canonical.encode()).digest()[:12])


@dataclass(frozen=True, slots=True, kw_only=True)
class PageTokenCodec:
    """Issues and checks page tokens with one secret key."""

    key: bytes = field(repr=False)
    """The HMAC-SHA256 key, at least :data:`MIN_KEY_BYTES` bytes."""
    max_length: int = MAX_TOKEN_LENGTH
    """Longest token accepted (and issued)."""

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"a page-token key needs at least {MIN_KEY_BYTES} bytes")
        if self.max_length < 64:
            raise ValueError(f"max_length must be at least 64, got {self.max_length}")

    def encode(self, position: Mapping[str, Scalar], filters: Mapping[str, Any]) -> str:
        """The token of ``position`` under ``filters``.

        Raises:
            ValueError: a position value is not a finite scalar, a field is named
                :data:`FILTERS_KEY`, or the token would exceed ``max_length`` (all bugs of
                the caller, never of a request).
        """
        if FILTERS_KEY in position:
            raise ValueError(f"a position field may not be named {FILTERS_KEY!r}")
        for name, value in position.items():
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"position field {name!r} is not an int, float or str")
        payload = json.dumps(
            {**position, FILTERS_KEY: filters_fingerprint(filters)},
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        token = f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"
        if len(token) > self.max_length:
            raise ValueError(f"a page token of {len(token)} characters exceeds {self.max_length}")
        return token

    def decode(self, token: str, filters: Mapping[str, Any]) -> dict[str, Scalar]:
        """The position ``token`` holds, if this codec issued it for ``filters``.

        Raises:
            PageTokenInvalid: too long, malformed, not signed with our key, or issued for
                other filters.
        """
        if len(token) > self.max_length:
            raise PageTokenInvalid(
                f"is {len(token)} characters; page tokens are at most {self.max_length}"
            )
        encoded_payload, dot, encoded_mac = token.partition(".")
        if not dot:
            raise PageTokenInvalid("is not a page token this service issued")
        payload, mac = _b64decode(encoded_payload), _b64decode(encoded_mac)
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise PageTokenInvalid("is not a page token this service issued")
        # Signed by us, so the payload is our own flat object; checked anyway.
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise PageTokenInvalid("is not a page token this service issued") from exc
        if not isinstance(data, dict) or not all(_is_scalar(v) for v in data.values()):
            raise PageTokenInvalid("is not a page token this service issued")
        if data.pop(FILTERS_KEY, None) != filters_fingerprint(filters):
            raise PageTokenInvalid("was issued for a different filter")
        return data

    def _mac(self, payload: bytes) -> bytes:
        return hmac.digest(self.key, _MAC_DOMAIN + payload, hashlib.sha256)


def _is_scalar(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int | str)


def key_path(environ: Mapping[str, str]) -> Path:
    """Where the key is read from: ``PAYMESH_PAGE_TOKEN_KEY_FILE``, else the generated one."""
    configured = environ.get(KEY_FILE_VAR)
    if configured:
        return Path(configured)
    return Path(environ.get("PAYMESH_VAR_DIR") or "var") / GENERATED_KEY_NAME


def load_key(environ: Mapping[str, str]) -> bytes:
    """The key ``environ`` names, generating ``<var>/page-token.key`` (mode 0600) if absent.

    A configured file is never created: its absence is an error, not a fresh key.

    Raises:
        PageTokenKeyError: the file cannot be read or holds too few bytes.
    """
    path = key_path(environ)
    # A named file is reported as its variable and value; the generated one by its path.
    named = f"{KEY_FILE_VAR}={str(path)!r}" if environ.get(KEY_FILE_VAR) else f"{str(path)!r}"
    try:
        if not environ.get(KEY_FILE_VAR) and not path.exists():
            _generate_key(path)
        key = path.read_bytes().strip()
    except OSError as exc:
        raise PageTokenKeyError(
            f"{named}: cannot read or create the page-token key: {exc}"
            f" (a file of at least {MIN_KEY_BYTES} bytes)"
        ) from exc
    if len(key) < MIN_KEY_BYTES:
        raise PageTokenKeyError(
            f"{named}: the page-token key holds {len(key)} bytes; at least {MIN_KEY_BYTES} needed"
        )
    return key


def _generate_key(path: Path) -> None:
    """Write a fresh key to ``path`` unless another process got there first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        # link() never replaces: when services start together, the first key wins and
        # every process reads that one (a reader never sees a half-written file).
        with contextlib.suppress(FileExistsError):
            os.link(staging, path)
    finally:
        staging.unlink()


@functools.cache
def process_codec() -> PageTokenCodec:
    """The codec of this process, keyed from ``os.environ`` on first use."""
    return PageTokenCodec(key=load_key(os.environ))
