"""``delivery.post`` against real HTTP(S) endpoints on loopback: where it connects, what it checks.

The endpoints are aiohttp servers on 127.0.0.1 and 127.0.0.2 (the same port on both), so a test
sees which address a post reached. Names under ``.test`` resolve nowhere but through the pin:
a post reaches the address it was given even when DNS would now answer another, verifies the
certificate for the host name (not the address), follows no redirect, reads only an excerpt of
the answer and takes no proxy from the environment. Each endpoint records the connections its
requests came on, so a test sees which posts shared one and which connections are still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.notification import delivery
from services.notification.delivery import DeliveryClient, DestinationPolicy, PoolSettings
from tests.integration.harness import eventually
from tests.integration.webhook_receiver import FixedDns

DEV = DestinationPolicy()
FIRST, SECOND = "127.0.0.1", "127.0.0.2"


@dataclass
class Endpoint:
    """What one listening address received, and on which connections."""

    hits: list[str] = field(default_factory=list)
    """``Host`` header and path of each request, as ``host path``."""
    connections: dict[asyncio.BaseTransport, str] = field(default_factory=dict)
    """Each connection a request arrived on, with the ``Host`` of its first request."""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    """``/held`` answers once this is set."""

    def seen(self, request: web.Request) -> None:
        self.hits.append(f"{request.headers['Host']} {request.path}")
        assert request.transport is not None
        self.connections.setdefault(request.transport, request.headers["Host"])

    def opened(self, host: str) -> int:
        """How many connections ``host``'s requests came on."""
        return sum(first == host for first in self.connections.values())

    def open(self) -> list[str]:
        """The first ``Host`` of each connection still open, sorted."""
        return sorted(h for t, h in self.connections.items() if not t.is_closing())


@dataclass
class Endpoints:
    port: int
    by_address: dict[str, Endpoint]


def _app(endpoint: Endpoint) -> web.Application:
    async def hooks(request: web.Request) -> web.Response:
        endpoint.seen(request)
        await request.read()
        return web.json_response({"received": True})

    async def moved(request: web.Request) -> web.Response:
        endpoint.seen(request)
        raise web.HTTPFound("/hooks")

    async def large(request: web.Request) -> web.Response:
        endpoint.seen(request)
        return web.Response(status=500, body=b"x" * 1_000_000)

    async def held(request: web.Request) -> web.Response:
        endpoint.seen(request)
        await endpoint.release.wait()
        return web.json_response({"received": True})

    app = web.Application()
    app.router.add_post("/hooks", hooks)
    app.router.add_post("/moved", moved)
    app.router.add_post("/large", large)
    app.router.add_post("/held", held)
    return app


@contextlib.asynccontextmanager
async def _serving(tls: ssl.SSLContext | None = None) -> AsyncIterator[Endpoints]:
    """An endpoint on FIRST and SECOND, on one port."""
    runners: list[web.AppRunner] = []
    by_address: dict[str, Endpoint] = {}
    port = 0
    try:
        for address in (FIRST, SECOND):
            by_address[address] = Endpoint()
            runner = web.AppRunner(_app(by_address[address]))
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, address, port, ssl_context=tls)
            await site.start()
            port = runner.addresses[0][1]
        yield Endpoints(port, by_address)
    finally:
        for endpoint in by_address.values():
            endpoint.release.set()  # a held request left waiting would hold the cleanup
        for runner in runners:
            await runner.cleanup()


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name ``name`` only (no IP SAN) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.asynccontextmanager
async def _client(settings: PoolSettings | None = None) -> AsyncIterator[DeliveryClient]:
    client = DeliveryClient(settings)
    try:
        yield client
    finally:
        await client.close()


async def _post(
    url: str,
    dns: FixedDns,
    client: DeliveryClient,
    *,
    tls: ssl.SSLContext | None = None,
) -> delivery.WebhookAnswer:
    destination = delivery.parse(url, DEV)
    addresses = await delivery.resolve(destination, DEV, dns)
    async with asyncio.timeout(10):
        return await delivery.post(destination, addresses, b"{}", {}, tls=tls, client=client)


async def test_post_reaches_the_checked_address_though_dns_now_answers_another() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"rebind.test": [[SECOND], [FIRST]]})
        url = f"http://rebind.test:{endpoints.port}/hooks"
        answer = await _post(url, dns, client)
        assert answer.status == 200
        assert dns.lookups == ["rebind.test"]
        host = f"rebind.test:{endpoints.port}"
        assert endpoints.by_address[SECOND].hits == [f"{host} /hooks"]
        assert endpoints.by_address[FIRST].hits == []


async def test_concurrent_posts_to_one_name_each_reach_their_own_checked_address() -> None:
    async with _serving() as endpoints, _client() as client:
        url = f"http://same.test:{endpoints.port}/hooks"
        destination = delivery.parse(url, DEV)
        posts = [
            delivery.post(destination, [ipaddress.ip_address(a)], b"{}", {}, client=client)
            for a in (FIRST, SECOND, FIRST, SECOND)
        ]
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*posts)
        assert [a.status for a in answers] == [200] * 4
        assert [len(e.hits) for e in endpoints.by_address.values()] == [2, 2]


async def test_tls_verifies_the_certificate_for_the_host_name(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "hooks.test")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with _serving(served) as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]], "other.test": [[FIRST]]})
        answer = await _post(
            f"https://hooks.test:{endpoints.port}/hooks", dns, client, tls=trusting
        )
        assert answer.status == 200
        with pytest.raises(ssl.SSLCertVerificationError, match=r"other\.test"):
            await _post(f"https://other.test:{endpoints.port}/hooks", dns, client, tls=trusting)
        # The address is not the name: a certificate without an IP SAN does not cover it.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _post(f"https://{FIRST}:{endpoints.port}/hooks", dns, client, tls=trusting)
        assert len(endpoints.by_address[FIRST].hits) == 1


async def test_untrusted_self_signed_certificate_fails_verification(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "hooks.test")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    async with _serving(served) as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        with pytest.raises(ssl.SSLCertVerificationError):
            await _post(f"https://hooks.test:{endpoints.port}/hooks", dns, client)
        assert endpoints.by_address[FIRST].hits == []


async def test_redirect_is_answered_not_followed() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        answer = await _post(f"http://hooks.test:{endpoints.port}/moved", dns, client)
        assert answer.status == 302
        assert [hit.split()[1] for hit in endpoints.by_address[FIRST].hits] == ["/moved"]


async def test_only_an_excerpt_of_the_answer_is_read() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        answer = await _post(f"http://hooks.test:{endpoints.port}/large", dns, client)
        assert (answer.status, answer.excerpt) == (500, "x" * delivery.MAX_EXCERPT_BYTES)


async def test_proxy_from_the_environment_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        answer = await _post(f"http://hooks.test:{endpoints.port}/hooks", dns, client)
        assert answer.status == 200 and len(endpoints.by_address[FIRST].hits) == 1


async def test_refused_connection_reports_the_socket_error() -> None:
    async with _serving() as endpoints:
        port = endpoints.port
    async with _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        with pytest.raises(ConnectionRefusedError):
            await _post(f"http://hooks.test:{port}/hooks", dns, client)


# -- kept connections --------------------------------------------------------------------------


async def test_posts_to_one_url_share_one_connection() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        for _ in range(3):
            answer = await _post(f"http://hooks.test:{endpoints.port}/hooks", dns, client)
            assert answer.status == 200
        endpoint = endpoints.by_address[FIRST]
        assert len(endpoint.hits) == 3
        assert endpoint.opened(f"hooks.test:{endpoints.port}") == 1


async def test_a_changed_dns_answer_gets_a_new_connection_to_the_new_address() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"rebind.test": [[FIRST], [SECOND]]})
        url = f"http://rebind.test:{endpoints.port}/hooks"
        await _post(url, dns, client)
        await _post(url, dns, client)  # the kept connection to FIRST is not the new answer's
        host = f"rebind.test:{endpoints.port}"
        assert endpoints.by_address[FIRST].hits == [f"{host} /hooks"]
        assert endpoints.by_address[SECOND].hits == [f"{host} /hooks"]
        assert [key.addresses for key in client.pools] == [
            frozenset({ipaddress.ip_address(FIRST)}),
            frozenset({ipaddress.ip_address(SECOND)}),
        ]


async def test_each_host_name_has_its_own_connections_at_one_address() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"a.test": [[FIRST]], "b.test": [[FIRST]]})
        for name in ("a", "b", "a", "b"):
            await _post(f"http://{name}.test:{endpoints.port}/hooks", dns, client)
        endpoint = endpoints.by_address[FIRST]
        assert endpoint.opened(f"a.test:{endpoints.port}") == 1
        assert endpoint.opened(f"b.test:{endpoints.port}") == 1
        assert len(endpoint.connections) == 2


async def test_a_connection_with_an_unread_answer_is_not_kept() -> None:
    async with _serving() as endpoints, _client() as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        await _post(f"http://hooks.test:{endpoints.port}/large", dns, client)
        answer = await _post(f"http://hooks.test:{endpoints.port}/hooks", dns, client)
        assert answer.status == 200
        assert endpoints.by_address[FIRST].opened(f"hooks.test:{endpoints.port}") == 2


async def test_pools_beyond_the_cap_close_the_least_recently_used() -> None:
    async with _serving() as endpoints, _client(PoolSettings(max_pools=2)) as client:
        dns = FixedDns({name: [[FIRST]] for name in ("a.test", "b.test", "c.test")})
        port = endpoints.port
        for name in ("a", "b", "a", "c"):  # b is the least recently used when c comes
            await _post(f"http://{name}.test:{port}/hooks", dns, client)
        endpoint = endpoints.by_address[FIRST]
        await eventually(lambda: endpoint.open() == [f"a.test:{port}", f"c.test:{port}"])
        assert [key.host for key in client.pools] == ["a.test", "c.test"]
        await _post(f"http://a.test:{port}/hooks", dns, client)
        await _post(f"http://b.test:{port}/hooks", dns, client)
        assert (endpoint.opened(f"a.test:{port}"), endpoint.opened(f"b.test:{port}")) == (1, 2)


async def test_eviction_leaves_a_pool_with_a_post_in_flight_open_until_it_ends() -> None:
    async with _serving() as endpoints, _client(PoolSettings(max_pools=1)) as client:
        dns = FixedDns({"held.test": [[FIRST]], "other.test": [[SECOND]]})
        port = endpoints.port
        held = asyncio.create_task(_post(f"http://held.test:{port}/held", dns, client))
        first = endpoints.by_address[FIRST]
        await eventually(lambda: len(first.hits) == 1)
        await _post(f"http://other.test:{port}/hooks", dns, client)  # evicts held.test's pool
        assert [key.host for key in client.pools] == ["other.test"]
        first.release.set()
        assert (await held).status == 200  # a closed pool would have cut it off
        await eventually(lambda: first.open() == [])
        assert endpoints.by_address[SECOND].open() == [f"other.test:{port}"]


async def test_idle_connections_close_after_the_keepalive() -> None:
    # The server keeps an idle connection 75 s: a close within the poll is the client's.
    async with _serving() as endpoints, _client(PoolSettings(keepalive_s=0.2)) as client:
        dns = FixedDns({"hooks.test": [[FIRST]]})
        port = endpoints.port
        await _post(f"http://hooks.test:{port}/hooks", dns, client)
        endpoint = endpoints.by_address[FIRST]
        assert endpoint.open() == [f"hooks.test:{port}"]
        await eventually(lambda: endpoint.open() == [])
        assert len(client.pools) == 1  # the pool stays; its next post connects anew
        await _post(f"http://hooks.test:{port}/hooks", dns, client)
        assert endpoint.opened(f"hooks.test:{port}") == 2


async def test_close_closes_every_connection_kept_or_in_use() -> None:
    async with _serving() as endpoints:
        client = DeliveryClient(PoolSettings(max_pools=1))
        dns = FixedDns({"held.test": [[FIRST]], "a.test": [[SECOND]]})
        port = endpoints.port
        held = asyncio.create_task(_post(f"http://held.test:{port}/held", dns, client))
        await eventually(lambda: len(endpoints.by_address[FIRST].hits) == 1)
        await _post(f"http://a.test:{port}/hooks", dns, client)  # held.test's pool is evicted
        assert [len(e.open()) for e in endpoints.by_address.values()] == [1, 1]
        await client.close()
        assert client.pools == []
        by_address = endpoints.by_address
        await eventually(lambda: all(e.open() == [] for e in by_address.values()))
        with pytest.raises(ConnectionError, match="Server disconnected"):
            await held  # cut off by the stop, not by its timeout
