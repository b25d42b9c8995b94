"""``delivery.post`` against real HTTP(S) endpoints on loopback: where it connects, what it checks.

The endpoints are aiohttp servers on 127.0.0.1 and 127.0.0.2 (the same port on both), so a test
sees which address a post reached. Names under ``.test`` resolve nowhere but through the pin:
a post reaches the address it was given even when DNS would now answer another, verifies the
certificate for the host name (not the address), follows no redirect, reads only an excerpt of
the answer and takes no proxy from the environment.
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
from services.notification.delivery import DeliveryClient, DestinationPolicy
from tests.integration.webhook_receiver import FixedDns

DEV = DestinationPolicy()
FIRST, SECOND = "127.0.0.1", "127.0.0.2"


@dataclass
class Endpoint:
    """What one listening address received."""

    hits: list[str] = field(default_factory=list)
    """``Host`` header and path of each request, as ``host path``."""


@dataclass
class Endpoints:
    port: int
    by_address: dict[str, Endpoint]


def _app(endpoint: Endpoint) -> web.Application:
    async def hooks(request: web.Request) -> web.Response:
        endpoint.hits.append(f"{request.headers['Host']} {request.path}")
        await request.read()
        return web.json_response({"received": True})

    async def moved(request: web.Request) -> web.Response:
        endpoint.hits.append(f"{request.headers['Host']} {request.path}")
        raise web.HTTPFound("/hooks")

    async def large(request: web.Request) -> web.Response:
        return web.Response(status=500, body=b"x" * 10_000)

    app = web.Application()
    app.router.add_post("/hooks", hooks)
    app.router.add_post("/moved", moved)
    app.router.add_post("/large", large)
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
async def _client() -> AsyncIterator[DeliveryClient]:
    client = DeliveryClient()
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
