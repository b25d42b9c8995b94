"""Limits on API-key verification, so that guessing secrets cannot starve merchant-auth.

How many verifications may run at once, and how many failures a key id or a client peer may
collect in a sliding window before its further attempts are refused without doing the work.
A peer that recently proved it holds a key is not locked out of that key by others' failures
(OWASP's "device cookie" lockout, with the client's address as the device). No gRPC here.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

log = logging.getLogger("paymesh.merchant_auth")

Clock = Callable[[], float]

#: Longest peer text kept; a longer forwarded value is cut, so no caller inflates memory.
MAX_PEER_LENGTH = 128
#: IPv6 clients are counted per /64, the block one subscriber usually gets.
IPV6_PEER_PREFIX = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationLimits:
    """How much verification work callers may cause, and how much failing they may do."""

    max_in_flight: int = 16
    """Verifications running at once; one more is refused with OVERLOADED. An HMAC check ends
    before another call runs, so slots are held by what waits: legacy scrypt in a thread."""
    overload_retry_s: float = 0.1
    """RetryInfo delay told to a caller refused with OVERLOADED."""
    key_failures: int = 10
    """Failed verifications of one key id within ``window_s`` before it is locked."""
    peer_failures: int = 20
    """Failed verifications from one client peer within ``window_s`` before it is locked."""
    window_s: float = 60.0
    """Length of the sliding window failures are counted in."""
    known_peer_s: float = 86_400.0
    """How long a peer that authenticated with a key stays exempt from that key's lock."""
    max_tracked: int = 10_000
    """Key ids, peers and keys with known peers remembered at most (each); oldest go first."""
    max_known_peers_per_key: int = 16
    """Peers remembered per key as having authenticated with it."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not value >= MINIMA[field.name]:  # also refuses nan
                raise ValueError(f"{field.name} must be at least {MINIMA[field.name]}, got {value}")


#: Smallest allowed value of each limit.
MINIMA: dict[str, float] = {
    "max_in_flight": 1,
    "overload_retry_s": 0,
    "key_failures": 1,
    "peer_failures": 1,
    "window_s": 0.001,
    "known_peer_s": 0,
    "max_tracked": 1,
    "max_known_peers_per_key": 1,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why an attempt is refused before any verification work, and for how long."""

    subject: Literal["key_id", "peer"]
    """What reached its failure limit."""
    retry_after_s: float
    """Seconds until the oldest counted failure leaves the window."""


def peer_address(peer: str) -> str:
    """The client a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:%5B::1%5D:5``) stands for.

    The port is dropped (every connection has another), IPv6 becomes its /64 and an
    IPv4-mapped IPv6 address its IPv4 address; anything unparsable is kept as given (cut).
    """
    text = urllib.parse.unquote(peer.strip()[:MAX_PEER_LENGTH])
    host = text.removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PEER_PREFIX}", strict=False))
    return str(ip)


def client_peer(forwarded: str | None, transport_peer: str) -> str:
    """The merchant's address: what the mesh caller forwarded, else the connection's peer.

    The forwarded value is trusted because only mesh identities can reach merchant-auth.
    """
    if forwarded is not None and forwarded.strip():
        return peer_address(forwarded)
    return peer_address(transport_peer)


class FailureWindow:
    """Recent failures per subject (a key id or a peer) over a sliding window, bounded.

    Only the last ``limit`` failure times of a subject are kept: the subject is locked while
    that many lie within the window. Subjects are kept in order of their last failure, so the
    expired and, beyond ``max_subjects``, the longest quiet are forgotten first.
    """

    def __init__(self, *, limit: int, window_s: float, max_subjects: int, clock: Clock) -> None:
        self._limit = limit
        self._window_s = window_s
        self._max_subjects = max_subjects
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after_s(self, subject: str) -> float | None:
        """Seconds until ``subject`` may be tried again, or ``None`` if it may be now."""
        times = self._failures.get(subject)
        if times is None:
            return None
        now = self._clock()
        self._expire(times, now)
        if not times:
            del self._failures[subject]
            return None
        if len(times) < self._limit:
            return None
        return times[0] + self._window_s - now

    def record(self, subject: str) -> bool:
        """Count a failure of ``subject`` now; whether that locked it."""
        now = self._clock()
        times = self._failures.pop(subject, None)
        if times is None:
            times = deque(maxlen=self._limit)
        self._expire(times, now)
        times.append(now)
        self._failures[subject] = times
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if len(self._failures) <= self._max_subjects and oldest[-1] + self._window_s > now:
                break
            self._failures.popitem(last=False)
        return len(times) >= self._limit

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] + self._window_s <= now:
            times.popleft()


class KnownPeers:
    """Which peers recently authenticated with which key, bounded per key and in total."""

    def __init__(self, *, ttl_s: float, max_keys: int, max_per_key: int, clock: Clock) -> None:
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._max_per_key = max_per_key
        self._clock = clock
        self._peers: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def remember(self, key_id: str, peer: str) -> None:
        """``peer`` just authenticated with ``key_id``."""
        if self._ttl_s <= 0:
            return
        peers = self._peers.pop(key_id, None) or OrderedDict()
        peers.pop(peer, None)
        peers[peer] = self._clock() + self._ttl_s
        while len(peers) > self._max_per_key:
            peers.popitem(last=False)
        self._peers[key_id] = peers
        while len(self._peers) > self._max_keys:
            self._peers.popitem(last=False)

    def knows(self, key_id: str, peer: str) -> bool:
        """Whether ``peer`` authenticated with ``key_id`` within the TTL."""
        peers = self._peers.get(key_id)
        expires = peers.get(peer) if peers is not None else None
        return expires is not None and self._clock() < expires


class InFlightLimit:
    """A count of verifications running, refusing (never queueing) one beyond the limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running = 0

    @property
    def running(self) -> int:
        """Verifications started and not finished."""
        return self._running

    def try_start(self) -> bool:
        """Take a slot if one is free; ``False`` means refuse the caller now."""
        if self._running >= self._limit:
            return False
        self._running += 1
        return True

    def finish(self) -> None:
        """Give back a slot taken by :meth:`try_start`."""
        self._running -= 1


class VerificationGuard:
    """The limits of one merchant-auth process, as the servicer asks them."""

    def __init__(self, limits: VerificationLimits, *, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.in_flight = InFlightLimit(limits.max_in_flight)
        self._keys = FailureWindow(
            limit=limits.key_failures,
            window_s=limits.window_s,
            max_subjects=limits.max_tracked,
            clock=clock,
        )
        self._peers = FailureWindow(
            limit=limits.peer_failures,
            window_s=limits.window_s,
            max_subjects=limits.max_tracked,
            clock=clock,
        )
        self._known = KnownPeers(
            ttl_s=limits.known_peer_s,
            max_keys=limits.max_tracked,
            max_per_key=limits.max_known_peers_per_key,
            clock=clock,
        )

    def refusal(self, *, peer: str, key_id: str | None) -> Refusal | None:
        """Why an attempt from ``peer`` for ``key_id`` must be refused unverified, if it must."""
        delay = self._peers.retry_after_s(peer)
        if delay is not None:
            return Refusal(subject="peer", retry_after_s=delay)
        if key_id is not None and not self._known.knows(key_id, peer):
            delay = self._keys.retry_after_s(key_id)
            if delay is not None:
                return Refusal(subject="key_id", retry_after_s=delay)
        return None

    def failed(self, *, peer: str, key_id: str | None) -> None:
        """Count a failed verification; ``key_id`` only if the key exists (so made-up ids
        cannot push real ones out of the bounded memory)."""
        if self._peers.record(peer):
            log.warning(
                "client peer %s locked: %d failed key verifications within %.0f s",
                peer,
                self.limits.peer_failures,
                self.limits.window_s,
            )
        if key_id is not None and self._keys.record(key_id):
            log.warning(
                "API key %s locked for peers it does not know: %d failed verifications"
                " within %.0f s",
                key_id,
                self.limits.key_failures,
                self.limits.window_s,
            )

    def succeeded(self, *, peer: str, key_id: str) -> None:
        """``peer`` presented the real secret of ``key_id``: it is exempt from that key's lock."""
        self._known.remember(key_id, peer)
