"""TLS handshake failures through the chain: reported, sent once, never held against breakers.

Real TLS servers on 127.0.0.1 with certificates of a development PKI (``services.mesh.pki``); the
client trusts a second, unrelated CA (or the server's certificate has expired), exactly what a
mis-rolled certificate looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc import aio

from interceptors.chain import ClientChain
from interceptors.errors import CallError, PartnerCallError
from interceptors.http import PartnerClient
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from services.mesh.pki import PkiLayout, ensure_dev_pki, issue_leaf_with, spiffe_id
from services.mesh.server import ServerPolicyInterceptor
from tests.integration.harness import TARGET, RunningServer, ScriptedServicer, make_chain
from tests.servers import error_reason

CALLS = 12
PARTNER = "exchange-rate"


@dataclass(frozen=True, slots=True)
class Certificates:
    """The target's identity under the mesh CA, and a CA that has nothing to do with it."""

    mesh: PkiLayout
    stranger: PkiLayout

    def trusting(self, layout: PkiLayout) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(layout.ca_cert.read_bytes())

    def identity(self, name: str = TARGET) -> tuple[bytes, bytes]:
        return self.mesh.key(name).read_bytes(), self.mesh.cert(name).read_bytes()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    mesh, stranger = tmp_path_factory.mktemp("mesh"), tmp_path_factory.mktemp("stranger")
    ensure_dev_pki(mesh, [TARGET])
    ensure_dev_pki(stranger, ["stranger"])
    now = datetime.datetime.now(datetime.UTC)
    issue_leaf_with(
        mesh,
        "expired",
        spiffe=spiffe_id(TARGET),
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    return Certificates(mesh=PkiLayout(directory=mesh), stranger=PkiLayout(directory=stranger))


@contextlib.asynccontextmanager
async def tls_serving(identity: tuple[bytes, bytes]) -> AsyncIterator[RunningServer]:
    """The scripted test service behind TLS (server authentication only)."""
    servicer = ScriptedServicer()
    server = aio.server(interceptors=[ServerPolicyInterceptor(domain=servicer.name)])
    testing_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([identity]))
    await server.start()
    try:
        yield RunningServer(server=server, port=port, servicer=servicer)
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def tls_stub(
    chain: ClientChain, address: str, credentials: grpc.ChannelCredentials
) -> AsyncIterator[testing_pb2_grpc.TestServiceAsyncStub]:
    """A stub on a TLS aio channel with the chain on it."""
    channel = aio.secure_channel(
        address,
        credentials,
        options=chain.channel_options(),
        interceptors=chain.aio_interceptors(TARGET),
    )
    try:
        yield testing_pb2_grpc.TestServiceStub(channel)
    finally:
        await channel.close()


def tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "TLS handshake" in r.getMessage()
    ]


async def test_a_trusted_certificate_is_served(certificates: Certificates) -> None:
    chain = make_chain()
    async with tls_serving(certificates.identity()) as srv:
        async with tls_stub(chain, srv.address, certificates.trusting(certificates.mesh)) as stub:
            response = await stub.Read(pb.ReadRequest(text="hi"))
    assert response.text == "hi"


async def test_untrusted_certificate_fails_once_with_tls_handshake_failed(
    certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    chain = make_chain()
    credentials = certificates.trusting(certificates.stranger)
    caplog.set_level(logging.WARNING, logger="paymesh.chain")
    async with tls_serving(certificates.identity()) as srv:
        async with tls_stub(chain, srv.address, credentials) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    error = caught.value
    assert (error.code(), error.attempts, error.stop_reason) == (
        grpc.StatusCode.UNAVAILABLE,
        1,
        "not_retryable",
    )
    assert error_reason(error) == "TLS_HANDSHAKE_FAILED"
    assert "CERTIFICATE_VERIFY_FAILED" in (error.details() or "")
    assert srv.servicer.count() == 0
    [warning] = tls_warnings(caplog)
    assert TARGET in warning and "CERTIFICATE_VERIFY_FAILED" in warning


async def test_untrusted_certificate_never_opens_the_breaker(
    certificates: Certificates,
) -> None:
    chain = make_chain()
    credentials = certificates.trusting(certificates.stranger)
    async with tls_serving(certificates.identity()) as srv:
        async with tls_stub(chain, srv.address, credentials) as stub:
            for _ in range(CALLS):
                with pytest.raises(CallError) as caught:
                    await stub.Read(pb.ReadRequest())
                assert (caught.value.attempts, error_reason(caught.value)) == (
                    1,
                    "TLS_HANDSHAKE_FAILED",
                )
    assert chain.breakers.states() == {TARGET: "closed"}
    assert chain.telemetry.value("tls_handshake_failures_total", target=TARGET) == CALLS


async def test_expired_certificate_is_a_tls_handshake_failure_naming_the_expiry(
    certificates: Certificates,
) -> None:
    chain = make_chain()
    credentials = certificates.trusting(certificates.mesh)
    async with tls_serving(certificates.identity("expired")) as srv:
        async with tls_stub(chain, srv.address, credentials) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    assert (caught.value.attempts, error_reason(caught.value)) == (1, "TLS_HANDSHAKE_FAILED")
    assert "certificate has expired" in (caught.value.details() or "")


async def test_sync_untrusted_certificate_fails_once_and_never_opens_the_breaker(
    certificates: Certificates,
) -> None:
    chain = make_chain()
    credentials = certificates.trusting(certificates.stranger)

    def calls(address: str) -> list[CallError]:
        errors = []
        with grpc.secure_channel(address, credentials, options=chain.channel_options()) as ch:
            stub = testing_pb2_grpc.TestServiceStub(
                grpc.intercept_channel(ch, *chain.sync_interceptors(TARGET))
            )
            for _ in range(CALLS):
                try:
                    stub.Read(pb.ReadRequest())
                except CallError as err:
                    errors.append(err)
        return errors

    async with tls_serving(certificates.identity()) as srv:
        errors = await asyncio.to_thread(calls, srv.address)
    assert [(e.attempts, error_reason(e)) for e in errors] == [(1, "TLS_HANDSHAKE_FAILED")] * CALLS
    assert "CERTIFICATE_VERIFY_FAILED" in (errors[0].details() or "")
    assert chain.breakers.states() == {TARGET: "closed"}


@contextlib.contextmanager
def https_partner(cert: Path, key: Path) -> Iterator[str]:
    """An HTTPS partner answering 200 to every GET; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = b'{"rate": "1.1"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # A refused handshake raises in accept(), which socketserver drops quietly.
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_partner_with_a_trusted_certificate_answers(certificates: Certificates) -> None:
    trusted = ssl.create_default_context(cafile=certificates.mesh.ca_cert)
    with https_partner(certificates.mesh.cert(TARGET), certificates.mesh.key(TARGET)) as url:
        partner = PartnerClient(make_chain().runtime, PARTNER, url, ssl_context=trusted)
        status, body = await partner.request("GET", "/rates")
        await partner.aclose()
    assert (status, body) == (200, {"rate": "1.1"})


async def test_partner_with_an_untrusted_certificate_fails_once_and_never_opens_the_breaker(
    certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    chain = make_chain()
    caplog.set_level(logging.WARNING, logger="paymesh.chain")
    with https_partner(certificates.mesh.cert(TARGET), certificates.mesh.key(TARGET)) as url:
        client = chain.http_client(PARTNER, url)  # the system's trust store: not our CA
        errors = []
        for _ in range(CALLS):
            with pytest.raises(PartnerCallError) as caught:
                await client.request("GET", "/rates")
            errors.append(caught.value)
        await client.aclose()
    assert [(e.attempts, e.http_status, error_reason(e)) for e in errors] == [
        (1, None, "TLS_HANDSHAKE_FAILED")
    ] * CALLS
    assert "certificate verify failed" in (errors[0].details() or "")
    assert chain.breakers.states() == {PARTNER: "closed"}
    warnings = tls_warnings(caplog)
    assert len(warnings) == CALLS and all(PARTNER in w for w in warnings)
