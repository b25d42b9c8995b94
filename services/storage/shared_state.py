"""State shared by a service's replicas in Redis (``REDIS_URL``): the one seam every use takes.

Caches and failure counts go through :class:`SharedState`; without ``REDIS_URL`` there is
none and every caller keeps its in-process default. Redis failing is never the caller's
failure: an operation that cannot reach it answers :data:`UNAVAILABLE` (the caller falls back
to the source or to local counting) and Redis is left alone for ``retry_s`` before the next try.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("paymesh.shared_state")

REDIS_URL_VAR = "REDIS_URL"
KEY_PREFIX_VAR = "REDIS_KEY_PREFIX"
DEFAULT_KEY_PREFIX = "paymesh"
_PREFIX_SHAPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SCHEMES = ("redis", "rediss")
#: One Redis operation may take this long before the caller falls back (Redis on the LAN
#: answers in well under a millisecond; waiting longer only delays the payment).
OP_TIMEOUT_S = 0.25
#: After a failure, operations skip Redis for this long, so a dead Redis costs nothing per call.
RETRY_S = 1.0


class _Unavailable:
    """The answer of an operation that could not reach Redis."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE: Final = _Unavailable()


class SharedStateError(ValueError):
    """``REDIS_URL`` or ``REDIS_KEY_PREFIX`` is not usable; the message names the variable."""


def redacted(url: str) -> str:
    """``url`` without its password (for logs, health reports and error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    netloc = f"{user}:***@{host}{port}" if user else f":***@{host}{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def validate_url(url: str) -> str:
    """``url`` if it is ``redis://`` or ``rediss://`` with a host; SharedStateError if not."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise SharedStateError(
            f"{REDIS_URL_VAR}={redacted(url)!r} is not a URL ({exc}); "
            "allowed: redis://[:password@]host:port/db or rediss://..."
        ) from None
    db = parts.path.strip("/")
    if parts.scheme not in _SCHEMES or not parts.hostname or (db and not db.isdigit()):
        raise SharedStateError(
            f"{REDIS_URL_VAR}={redacted(url)!r} is not a Redis URL; "
            "allowed: redis://[:password@]host:port/db or rediss://..."
        )
    del port  # parsed only to refuse a bad one
    return url.strip()


class SharedState:
    """A Redis connection pool under one key prefix, with failure fallback and health."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_KEY_PREFIX,
        op_timeout_s: float = OP_TIMEOUT_S,
        retry_s: float = RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = redacted(validate_url(url))
        """Where Redis is, without its password."""
        self.prefix = prefix
        self._timeout_s = op_timeout_s
        self._retry_s = retry_s
        self._clock = clock
        self._client = aioredis.Redis.from_url(
            url.strip(),
            socket_timeout=op_timeout_s,
            socket_connect_timeout=op_timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._scripts: dict[str, Any] = {}  # source -> redis-py Script (its SHA computed once)
        self._down_until = 0.0
        self.last_error = ""
        """Why the last operation failed ("" while Redis answers)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SharedState | None:
        """The state ``REDIS_URL`` names, or None when it is unset or empty.

        Raises:
            SharedStateError: the URL or the key prefix is malformed.
        """
        prefix = environ.get(KEY_PREFIX_VAR, DEFAULT_KEY_PREFIX)
        if not _PREFIX_SHAPE.match(prefix):
            raise SharedStateError(
                f"{KEY_PREFIX_VAR}={prefix!r} is not a key prefix; allowed: 1-64 of "
                f"A-Z a-z 0-9 _ . - (default {DEFAULT_KEY_PREFIX})"
            )
        url = environ.get(REDIS_URL_VAR, "").strip()
        if not url:
            return None
        return cls(url, prefix=prefix)

    @property
    def healthy(self) -> bool:
        """Whether the last operation reached Redis."""
        return not self.last_error

    def key(self, *parts: str) -> str:
        """``<prefix>:<part>:<part>...``, the name every stored entry has."""
        return ":".join((self.prefix, *parts))

    async def get(self, key: str) -> bytes | _Unavailable | None:
        """The value at ``key`` (None: absent)."""
        value: bytes | _Unavailable | None = await self._run(self._client.get, key)
        return value

    async def set(self, key: str, value: bytes | str, *, ttl_s: float) -> None:
        """Store ``value`` at ``key`` for ``ttl_s`` seconds (best effort)."""
        await self._run(self._client.set, key, value, px=max(1, round(ttl_s * 1000)))

    async def get_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key``; None when absent, unreadable or Redis is unavailable
        (a cache reads its source then)."""
        raw = await self.get(key)
        if not isinstance(raw, bytes):
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def set_json(self, key: str, value: Mapping[str, Any], *, ttl_s: float) -> None:
        """Store the JSON object ``value`` at ``key`` for ``ttl_s`` seconds (best effort)."""
        await self.set(key, json.dumps(value, separators=(",", ":")), ttl_s=ttl_s)

    async def delete(self, *keys: str) -> bool:
        """Delete ``keys``; whether Redis confirmed it."""
        return await self._run(self._client.delete, *keys) is not UNAVAILABLE

    async def script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script atomically (EVALSHA, loading it once)."""
        command = self._scripts.get(source)
        if command is None:
            command = self._scripts[source] = self._client.register_script(source)
        return await self._run(command, keys=list(keys), args=list(args))

    async def ping(self) -> str:
        """PING now, whatever the back-off: "" if Redis answered, else why not."""
        self._down_until = 0.0
        await self._run(self._client.ping)
        return self.last_error

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _run(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._down_until and self._clock() < self._down_until:
            return UNAVAILABLE
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await operation(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return UNAVAILABLE
        if self.last_error:
            log.info("redis %s answers again", self.target)
            self.last_error = ""
        self._down_until = 0.0
        return result

    def _failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self.last_error:
            log.warning(
                "redis %s failed (%s); caches read their source and limits count locally",
                self.target,
                error,
            )
        self.last_error = error
        self._down_until = self._clock() + self._retry_s


class SharedCache:
    """Cached JSON objects of one kind, ``<prefix>:<namespace...>:<id>``, each with its TTL.

    An entry carries the wall-clock time it expires at, so a replica that reads it keeps it
    only for what is left (never a fresh TTL per reader); Redis drops it at the same moment.
    """

    def __init__(
        self, state: SharedState, *namespace: str, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.state = state
        self._namespace = namespace
        self._wall_clock = wall_clock

    def key(self, entry_id: str) -> str:
        """The Redis key of ``entry_id``."""
        return self.state.key(*self._namespace, entry_id)

    async def get(self, entry_id: str) -> tuple[dict[str, Any], float] | None:
        """The value and its seconds left; None when absent, expired or Redis is unavailable."""
        entry = await self.state.get_json(self.key(entry_id))
        if entry is None:
            return None
        value, expires = entry.get("value"), entry.get("expires_s")
        if not isinstance(value, dict) or not isinstance(expires, int | float):
            return None
        left = float(expires) - self._wall_clock()
        return (value, left) if left > 0 else None

    async def put(self, entry_id: str, value: Mapping[str, Any], *, ttl_s: float) -> None:
        """Keep ``value`` for ``ttl_s`` seconds (best effort: Redis down, nothing is kept)."""
        if ttl_s <= 0:
            return
        entry = {"value": dict(value), "expires_s": self._wall_clock() + ttl_s}
        await self.state.set_json(self.key(entry_id), entry, ttl_s=ttl_s)

    async def drop(self, entry_id: str) -> bool:
        """Forget ``entry_id``; whether Redis confirmed it."""
        return await self.state.delete(self.key(entry_id))
