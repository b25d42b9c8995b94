"""Where a webhook may go, and one POST there that DNS cannot steer elsewhere (SSRF defence).

A URL is checked as written (scheme, no credentials, literal addresses, metadata host names),
then its host is resolved once and every address it resolves to must pass too. aiohttp posts
over a connection to one of those checked addresses (its resolver answers only them; TLS still
verifies the certificate for the host name), so a DNS answer that changes between check and
connect (rebinding) cannot redirect it. Redirects are not followed: every answer but a 2xx is
a failed attempt. No gRPC import.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import re
import socket
import ssl
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


def parse(url: str, policy: DestinationPolicy) -> Destination:
    """The destination of ``url`` if it passes every check that needs no DNS.

    Raises:
        RefusedDestination: saying why, quoting at most a short prefix of the URL.
    """
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


class PinnedResolver(AbstractResolver):
    """aiohttp's DNS for direct posts: the addresses already checked for this request's host.

    The pin lives in a context variable that :func:`post` sets around its one request, so
    concurrent posts to the same host each connect to their own checked answer; a host with no
    pin (nothing else should ever be asked) resolves to nothing.
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The pinned addresses of ``host``, in the order they were checked.

        Raises:
            OSError: ``host`` and ``port`` are not what this request pinned.
        """
        pin = _PIN.get()
        if pin is None or (pin.destination.host, pin.destination.port) != (host, port):
            raise OSError(f"no checked address for {_short(host)}")
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in pin.addresses
        ]

    async def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class _Pin:
    destination: Destination
    addresses: Sequence[IPAddress]


_PIN: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("webhook_pin", default=None)


class DeliveryClient:
    """The HTTP client of direct webhook posts: one aiohttp session per process.

    Pinning is per request, not per connector: one connector whose :class:`PinnedResolver`
    answers from the request's own checked addresses serves every merchant, where a connector
    per destination would need a cache, eviction and closing of pools that may be in use.
    The price is keep-alive: aiohttp pools connections by host and port, so a kept one would
    carry a later request to an address checked for an earlier answer; every post opens its
    own connection (``force_close``), as one per webhook always did. Also: no DNS cache (the
    pin is the answer), no proxy from the environment, no cookies kept between merchants,
    redirects not followed, at most ``MAX_ANSWER_HEADERS`` answer headers.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session, made on first use (in the running loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=PinnedResolver(), use_dns_cache=False, force_close=True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # The caller bounds the time (asyncio.timeout); this only backs it up.
                timeout=aiohttp.ClientTimeout(total=BACKSTOP_TIMEOUT_S),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
                max_headers=MAX_ANSWER_HEADERS,
            )
        return self._session

    async def close(self) -> None:
        """Close the session and its connections (at the service's stop)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


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

    aiohttp connects to the first of ``addresses`` that accepts (never resolving the name
    again) and, over https, verifies the certificate for the host name. The caller bounds the
    time (``asyncio.timeout``). ``client`` is the process's (None: one for this post only).

    Raises:
        OSError: no address accepted a connection, TLS failed, or the connection closed
            before an answer.
        TimeoutError: aiohttp's backstop timeout passed.
        ValueError: the answer is not HTTP (or has more than ``MAX_ANSWER_HEADERS`` headers).
    """
    own = client is None
    client = client or DeliveryClient()
    url = URL(f"{destination.scheme}://{destination.host_header}{destination.target}", encoded=True)
    token = _PIN.set(_Pin(destination, tuple(addresses)))
    try:
        async with client.session().post(
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
            response.close()  # the rest of the body is not read
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
        _PIN.reset(token)
        if own:
            await client.close()


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
