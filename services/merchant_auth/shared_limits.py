"""The verification limits counted across merchant-auth's replicas, in Redis (``REDIS_URL``).

The same sliding windows as :mod:`services.merchant_auth.limits`, kept as one sorted set per
key id and per peer and decided by Lua scripts on Redis's own clock (atomic, one round trip,
no replica's clock trusted). Every failure is also counted locally, so when Redis cannot be
reached the local windows decide, as without Redis; the in-flight cap stays per process.
"""

from __future__ import annotations

import logging
import secrets

from services.merchant_auth.limits import Refusal, VerificationGuard
from services.storage.shared_state import UNAVAILABLE, SharedState

log = logging.getLogger("paymesh.merchant_auth")

#: Count a failure of the subject KEYS[1] now: drop those out of the window (ARGV[1] ms),
#: keep the last ARGV[2], expire the set with the window; the count within the window.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[2]) + 1))
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
"""

#: Whether the peer (KEYS[1], limit ARGV[2]) or, unless the peer is known for it (KEYS[3]),
#: the key id (KEYS[2], limit ARGV[3]; only if ARGV[4] is 1) is locked: {1 peer | 2 key id |
#: 0 neither, milliseconds until its oldest counted failure leaves the window}.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local function left(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) < limit then return nil end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
local delay = left(KEYS[1], tonumber(ARGV[2]))
if delay then return {1, delay} end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  delay = left(KEYS[2], tonumber(ARGV[3]))
  if delay then return {2, delay} end
end
return {0, 0}
"""


class SharedVerificationGuard:
    """:class:`VerificationGuard`'s failure windows and known peers, shared in Redis."""

    def __init__(self, local: VerificationGuard, state: SharedState, *, service: str) -> None:
        self.local = local
        """The process's own windows: always counted, deciding while Redis is unreachable."""
        self._state = state
        self._service = service
        # Members must differ even for failures in one millisecond on two replicas.
        self._member = secrets.token_hex(4)
        self._serial = 0

    def _failures_key(self, subject: str, value: str) -> str:
        return self._state.key(self._service, "failures", subject, value)

    def _known_key(self, key_id: str, peer: str) -> str:
        return self._state.key(self._service, "known", key_id, peer)

    async def refusal(self, *, peer: str, key_id: str | None) -> Refusal | None:
        """Why an attempt must be refused, by every replica's failures (local if Redis fails)."""
        limits = self.local.limits
        answer = await self._state.script(
            _CHECK,
            [
                self._failures_key("peer", peer),
                self._failures_key("key", key_id or ""),
                self._known_key(key_id or "", peer),
            ],
            [
                round(limits.window_s * 1000),
                limits.peer_failures,
                limits.key_failures,
                1 if key_id is not None else 0,
            ],
        )
        if answer is UNAVAILABLE:
            return self.local.refusal(peer=peer, key_id=key_id)
        subject, delay_ms = int(answer[0]), int(answer[1])
        if subject == 0:
            return None
        return Refusal(
            subject="peer" if subject == 1 else "key_id", retry_after_s=max(delay_ms, 0) / 1000
        )

    async def failed(self, *, peer: str, key_id: str | None) -> None:
        """Count a failed verification here and for every replica."""
        self.local.failed(peer=peer, key_id=key_id)
        limits = self.local.limits
        subjects = [("peer", peer, limits.peer_failures)]
        if key_id is not None:
            subjects.append(("key", key_id, limits.key_failures))
        for subject, value, limit in subjects:
            self._serial += 1
            count = await self._state.script(
                _RECORD,
                [self._failures_key(subject, value)],
                [round(limits.window_s * 1000), limit, f"{self._member}:{self._serial}"],
            )
            if count is UNAVAILABLE:
                return
            if int(count) == limit:
                log.warning(
                    "%s %s locked across replicas: %d failed key verifications within %.0f s",
                    "client peer" if subject == "peer" else "API key",
                    value,
                    limit,
                    limits.window_s,
                )

    async def succeeded(self, *, peer: str, key_id: str) -> None:
        """``peer`` holds ``key_id``'s secret: exempt from its lock on every replica."""
        self.local.succeeded(peer=peer, key_id=key_id)
        ttl_s = self.local.limits.known_peer_s
        if ttl_s > 0:
            await self._state.set(self._known_key(key_id, peer), b"1", ttl_s=ttl_s)
