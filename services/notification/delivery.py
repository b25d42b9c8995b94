"""Where a webhook may go, and one POST there that DNS cannot steer elsewhere (SSRF defence).

A URL is checked as written (scheme, no credentials, literal addresses, metadata host names),
then its host is resolved once and every address it resolves to must pass too. aiohttp posts
over a connection to one of those checked addresses (its resolver answers only them; TLS still
verifies the certificate for the host name), so a DNS answer that changes between check and
connect (rebinding) cannot redirect it; a connection is kept for later posts to the same host
and the same checked answer only. Redirects are not followed: every answer but a 2xx is a
failed attempt. No gRPC import.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves ``(host, port)`` to address strings, like ``getaddrinfo``.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

MAX_URL_LENGTH = 2048
#: Of an answer, only the status matters; a little of the body explains a failure.
MAX_EXCERPT_BYTES = 512
MAX_ANSWER_HEADERS = 100
#: The longest a post may take if its caller set no bound of its own.
BACKSTOP_TIMEOUT_S = 60.0
#: Connection pools kept (one per destination and answer), and how long an idle connection lives.
DEFAULT_MAX_POOLS = 64
DEFAULT_KEEPALIVE_S = 4.0
#: Cloud metadata and host-platform endpoints that are not link-local (or are, and matter most).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server (a public address)
        "192.0.0.192",  # Oracle Cloud
    )
)
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Characters a path or query may carry as they are (RFC 3986 reserved, unreserved and ``%``).
_URL_SAFE = "/%:@!$&'()*+,;=-._~"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
#: The reserved TLD (RFC 2606) whose merchants the partner sandbox plays in development.
SANDBOX_TLD = "example"


class RefusedDestination(ValueError):
    """A webhook URL, or an address its host resolves to, that no delivery may reach."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationPolicy:
    """Which webhook URLs and addresses a delivery may reach."""

    production: bool = False
    """``PAYMESH_ENV=production``: https only, publicly routable addresses only. Otherwise
    plain http to a loopback host and private addresses are allowed as well; link-local,
    metadata, multicast, unspecified and reserved addresses never are."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """A webhook URL that passed the checks that need no DNS."""

    scheme: str
    """``https``, or ``http`` to a loopback host in development."""
    host: str
    """Host name (IDNA, lower case) or address literal, without brackets."""
    port: int
    """TCP port."""
    host_header: str
    """``Host`` header: host and port as written."""
    target: str
    """Request target: path and query."""

    @property
    def literal(self) -> IPAddress | None:
        """The address, when the host is written as one."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    """What the merchant's endpoint answered."""

    status: int
    """HTTP status."""
    excerpt: str
    """The first bytes of the body, for the notification's last_error."""


def quoted(url: str) -> str:
    """A short prefix of a URL for messages, credentials cut out (it may carry a token)."""
    shown = _USERINFO.sub(r"\1", url)
    return repr(shown[:60] + ("..." if len(shown) > 60 else ""))


#: URLs whose checks are remembered (a merchant's URL is checked at every notification and
#: every attempt; the checks need no DNS, so the answer for one URL and policy never changes).
PARSED_URLS_KEPT = 1024


def parse(url: str, policy: DestinationPolicy) -> Destination:
    """The destination of ``url`` if it passes every check that needs no DNS.

    A URL that passed is remembered (:data:`PARSED_URLS_KEPT` of them, least recent out); a
    refused one is checked again each time.

    Raises:
        RefusedDestination: saying why, quoting at most a short prefix of the URL.
    """
    if len(url) > MAX_URL_LENGTH:  # before the cache: it keeps short URLs only
        raise RefusedDestination(f"is longer than {MAX_URL_LENGTH} characters")
    return _parse(url, policy)


@functools.lru_cache(maxsize=PARSED_URLS_KEPT)
def _parse(url: str, policy: DestinationPolicy) -> Destination:
    """:func:`parse`, uncached (an exception is not remembered: it is raised again)."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedDestination(f"is longer than {MAX_URL_LENGTH} characters")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F or char == "\\" for char in url):
        raise RefusedDestination(f"{quoted(url)} contains spaces, control characters or '\\'")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").rstrip(".").encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise RefusedDestination(f"{quoted(url)} is not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise RefusedDestination(f"{quoted(url)} is not an https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedDestination(f"{quoted(url)}: a webhook URL must not carry credentials")
    # Sent as ASCII: the IDNA host, and path and query percent-encoded where they are not.
    bracketed = f"[{host}]" if ":" in host else host
    destination = Destination(
        scheme=parts.scheme,
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
        host_header=bracketed + (f":{port}" if port else ""),
        target=quote(parts.path or "/", safe=_URL_SAFE)
        + (f"?{quote(parts.query, safe=_URL_SAFE + '?')}" if parts.query else ""),
    )
    if host in METADATA_HOSTS:
        raise RefusedDestination(f"{quoted(url)} names a cloud metadata service")
    if parts.scheme == "http" and policy.production:
        raise RefusedDestination(f"{quoted(url)} must be https in production")
    literal = destination.literal
    if literal is not None:
        _check_address(literal, policy, subject=f"{quoted(url)} is")
    if parts.scheme == "http":
        # A name is held to loopback once resolved (see resolve); an address right here.
        if literal is not None and not _effective(literal).is_loopback:
            raise RefusedDestination(f"{quoted(url)} must be https (plain http only to loopback)")
    elif policy.production and _is_loopback_name(host):
        raise RefusedDestination(f"{quoted(url)} is a loopback host, refused in production")
    return destination


def played_by_sandbox(destination: Destination, policy: DestinationPolicy) -> bool:
    """Whether the partner sandbox stands in for this merchant: ``*.example`` in development.

    Such hosts cannot exist (RFC 2606), so nothing real is reachable through this rule.
    """
    host = destination.host
    return not policy.production and (host == SANDBOX_TLD or host.endswith(f".{SANDBOX_TLD}"))


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Every address ``host`` resolves to, in the resolver's order (``getaddrinfo``)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve(
    destination: Destination, policy: DestinationPolicy, resolver: Resolver
) -> list[IPAddress]:
    """The checked addresses to connect to: all of the host's addresses, or a refusal.

    One bad address refuses the whole URL, so an attacker gains nothing by mixing answers.

    Raises:
        RefusedDestination: an address is not allowed under ``policy``.
        OSError: the name does not resolve (a delivery failure, not a refusal).
    """
    literal = destination.literal
    if literal is not None:
        return [literal]
    found = await resolver(destination.host, destination.port)
    if not found:
        raise OSError(f"{_short(destination.host)} resolves to no address")
    addresses: list[IPAddress] = []
    for text in found:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise RefusedDestination(
                f"{_short(destination.host)} resolves to no IP address"
            ) from None
        # The address itself is not told: the message must not map someone's internal DNS.
        _check_address(address, policy, subject=f"{_short(destination.host)} resolves to")
        if destination.scheme == "http" and not _effective(address).is_loopback:
            raise RefusedDestination(
                f"{_short(destination.host)} does not resolve to loopback only;"
                " plain http only to loopback"
            )
        addresses.append(address)
    return addresses


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSettings:
    """How many destinations keep connections open for their next post, and for how long."""

    max_pools: int = DEFAULT_MAX_POOLS
    """Connection pools kept, one per :class:`PoolKey`; beyond this the least recently used
    is closed (once no post is using it)."""
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    """How long an idle connection waits for the next post to its pool before it is closed.
    Shorter than the 5 s many servers keep an idle connection (Node's default), so a post
    rarely meets one the endpoint is closing."""

    def __post_init__(self) -> None:
        if self.max_pools < 1:
            raise ValueError(f"max_pools must be at least 1, got {self.max_pools!r}")
        if not (math.isfinite(self.keepalive_s) and self.keepalive_s > 0):
            raise ValueError(
                f"keepalive_s must be a positive number of seconds, got {self.keepalive_s!r}"
            )


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What a kept connection was opened for: a post may use it only if all four match."""

    scheme: str
    """``http`` or ``https``."""
    host: str
    """The URL's host: the name TLS verifies and sends as SNI."""
    port: int
    """TCP port."""
    addresses: frozenset[IPAddress]
    """The checked addresses the host resolved to: another answer is another pool."""


class PinnedResolver(AbstractResolver):
    """aiohttp's DNS for one pool: its host's checked addresses; any other host, nothing."""

    def __init__(self, host: str, port: int, addresses: Sequence[IPAddress]) -> None:
        self._host, self._port = host, port
        self._answer = [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The pinned addresses, in the order they were checked.

        Raises:
            OSError: ``host`` and ``port`` are not the pool's.
        """
        if (host, port) != (self._host, self._port):
            raise OSError(f"no checked address for {_short(host)}")
        return list(self._answer)

    async def close(self) -> None:
        """Nothing to release."""


class _Pool:
    """One destination's session, and whether posts use it or it is to be closed."""

    __slots__ = ("closing", "in_flight", "retired", "session")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.in_flight = 0
        self.retired = False  # out of the client's LRU: closed once in_flight is 0
        self.closing = False


class DeliveryClient:
    """The HTTP client of direct webhook posts: kept connections, each to checked addresses.

    A connection pool (an aiohttp session) per :class:`PoolKey`, whose :class:`PinnedResolver`
    answers only its own host with its own checked addresses: a kept connection carries only
    posts to the host and the very answer it was opened for, so a DNS answer that changes is
    another key and a new connection, never the old one steered. At most
    ``settings.max_pools`` are kept, least recently used out first; a pool is closed when it
    leaves and no post is using it, else when its last post ends. Idle connections close
    after ``settings.keepalive_s`` (aiohttp looks every ``keepalive_s``, so one may linger up
    to twice that; it is never reused past it). Also: no DNS cache (the pin is the answer), no
    proxy from the environment, no cookies kept between merchants, redirects not followed, at
    most ``MAX_ANSWER_HEADERS`` answer headers.
    """

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self._settings = settings or PoolSettings()
        self._pools: OrderedDict[PoolKey, _Pool] = OrderedDict()
        # Out of the LRU but with posts in flight: closed when the last one ends.
        self._draining: set[_Pool] = set()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def pools(self) -> list[PoolKey]:
        """The kept pools' keys, least recently used first."""
        return list(self._pools)

    async def post(
        self,
        destination: Destination,
        addresses: Sequence[IPAddress],
        body: bytes,
        headers: Mapping[str, str],
        *,
        tls: ssl.SSLContext | None = None,
    ) -> WebhookAnswer:
        """POST ``body`` to ``destination`` over a connection to one of ``addresses``.

        A kept connection of this destination and these very addresses is reused; else
        aiohttp connects to the first of ``addresses`` that accepts (never resolving the name
        again) and, over https, verifies the certificate for the host name. The caller bounds
        the time (``asyncio.timeout``).

        Raises:
            OSError: no address accepted a connection, TLS failed, or the connection closed
                before an answer.
            TimeoutError: aiohttp's backstop timeout passed.
            ValueError: the answer is not HTTP (or has more than ``MAX_ANSWER_HEADERS``
                headers).
        """
        url = URL(
            f"{destination.scheme}://{destination.host_header}{destination.target}", encoded=True
        )
        pool = self._acquire(destination, addresses)
        try:
            async with pool.session.post(
                url,
                data=body,
                headers=dict(headers),
                allow_redirects=False,
                ssl=tls if tls is not None else True,  # True: the system's trust, verified
            ) as response:
                excerpt = b""
                while len(excerpt) < MAX_EXCERPT_BYTES:
                    chunk = await response.content.read(MAX_EXCERPT_BYTES - len(excerpt))
                    if not chunk:
                        break
                    excerpt += chunk
                # Kept for the next post if the whole body was read; closed if more is unread.
                response.release()
                return WebhookAnswer(response.status, excerpt.decode("utf-8", "replace"))
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
            raise ValueError(f"the answer is not HTTP: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            # What the socket or TLS said (ConnectionRefusedError, SSLCertVerificationError...).
            raise exc.os_error from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc, OSError | TimeoutError):
                raise
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._release(pool)

    def _acquire(self, destination: Destination, addresses: Sequence[IPAddress]) -> _Pool:
        """The pool for ``destination`` at ``addresses``, made if new, counted as in use."""
        key = PoolKey(destination.scheme, destination.host, destination.port, frozenset(addresses))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._session(destination, addresses))
            while len(self._pools) > self._settings.max_pools:
                _, oldest = self._pools.popitem(last=False)
                oldest.retired = True
                if oldest.in_flight:
                    self._draining.add(oldest)
                else:
                    self._close_later(oldest)
        else:
            self._pools.move_to_end(key)
        pool.in_flight += 1
        return pool

    def _release(self, pool: _Pool) -> None:
        """A post on ``pool`` ended; a retired pool closes with its last one."""
        pool.in_flight -= 1
        if pool.retired and not pool.in_flight:
            self._draining.discard(pool)
            self._close_later(pool)

    def _session(
        self, destination: Destination, addresses: Sequence[IPAddress]
    ) -> aiohttp.ClientSession:
        resolver = PinnedResolver(destination.host, destination.port, addresses)
        connector = aiohttp.TCPConnector(
            resolver=resolver, use_dns_cache=False, keepalive_timeout=self._settings.keepalive_s
        )
        return aiohttp.ClientSession(
            connector=connector,
            # The caller bounds the time (asyncio.timeout); this only backs it up.
            timeout=aiohttp.ClientTimeout(total=BACKSTOP_TIMEOUT_S),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            max_headers=MAX_ANSWER_HEADERS,
        )

    def _close_later(self, pool: _Pool) -> None:
        # Not awaited by the post that retired it: its answer does not wait for a close.
        if pool.closing:
            return
        pool.closing = True
        task = asyncio.get_running_loop().create_task(pool.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every pool and its connections, in use or not (at the service's stop)."""
        pools = [*self._pools.values(), *self._draining]
        self._pools.clear()
        self._draining.clear()
        for pool in pools:
            pool.retired = True
            self._close_later(pool)
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def post(
    destination: Destination,
    addresses: Sequence[IPAddress],
    body: bytes,
    headers: Mapping[str, str],
    *,
    tls: ssl.SSLContext | None = None,
    client: DeliveryClient | None = None,
) -> WebhookAnswer:
    """POST ``body`` to ``destination`` over a connection to one of ``addresses``.

    See :meth:`DeliveryClient.post`; ``client`` is the process's (None: one for this post only).
    """
    if client is not None:
        return await client.post(destination, addresses, body, headers, tls=tls)
    own = DeliveryClient()
    try:
        return await own.post(destination, addresses, body, headers, tls=tls)
    finally:
        await own.close()


def _check_address(address: IPAddress, policy: DestinationPolicy, *, subject: str) -> None:
    """Refuse ``address``: "<subject> a link-local address", "... (refused in production)"."""
    kind = _refusal(address, policy)
    if kind is not None:
        where = ", refused in production" if kind in _PRODUCTION_ONLY else ""
        raise RefusedDestination(f"{subject} a {kind} address{where}")


_PRODUCTION_ONLY = frozenset({"loopback", "non-public"})


def _refusal(raw: IPAddress, policy: DestinationPolicy) -> str | None:
    """What kind of address ``raw`` is, if no delivery may reach it under ``policy``."""
    address = _effective(raw)
    if address in METADATA_ADDRESSES or raw in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified or address.is_multicast:
        return "non-unicast"
    if address.is_loopback:
        return "loopback" if policy.production else None
    if address.is_reserved:
        return "reserved"
    if policy.production and (address.is_private or not address.is_global):
        return "non-public"
    return None


def _effective(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64, Teredo), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _short(host: str) -> str:
    return host[:60] + ("..." if len(host) > 60 else "")


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return _effective(ipaddress.ip_address(host)).is_loopback
    except ValueError:
        return False
