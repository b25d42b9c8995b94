"""The mesh's transport security and admission against real servers on real TLS.

accounting-service (mesh port only) and merchant-service (also a merchant-facing port) run
through the real bootstrap with the session's test PKI. A mesh port admits only peers whose
client certificate the mesh CA signed and that is valid now; the caller is the certificate's
SPIFFE id, and a verified caller gets only the methods the topology grants it. Health is open
to every peer, reflection only to verified identities. Beyond its in-flight cap a service
sheds at once, and oversized messages or metadata are refused while the server keeps serving.
Every refusal is paired with the same call succeeding for the right caller, so none of these
passes against a server that is plaintext or authorizes nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from interceptors.errors import error_info, retry_delay_of, status_from_metadata
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.common.v1 import common_pb2
from services.accounting.__main__ import build as build_accounting
from services.merchant.__main__ import build as build_merchant
from services.mesh import pki
from services.mesh.bootstrap import Served, ServiceContext
from services.mesh.faults import Fault, FaultInjector
from services.mesh.topology import SERVICES
from tests import servers
from tests.servers import ServedAddress, mesh_channel, public_channel, running_service

ACCOUNTING = "accounting-service"
SERVICE = "/paymesh.accounting.v1.AccountingService"
GET_BALANCE = f"{SERVICE}/GetBalance"
#: Granted PostTransaction on accounting-service by the topology.
GATEWAY = "payment-gateway"
#: A mesh service granted nothing on accounting-service.
RISK = "risk-service"
#: Nothing listens here: a downstream a test does not need is unreachable, never a real mesh.
NOWHERE = "127.0.0.1:9"
TIMEOUT_S = 10.0
ACCOUNT = "merchants/m_1/available"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[ServedAddress]:
    async with running_service(
        ACCOUNTING, build_accounting, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
    ) as address:
        yield address


@pytest.fixture
async def merchants(tmp_path: Path) -> AsyncIterator[ServedAddress]:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": NOWHERE}
    environ |= {s.addr_var: NOWHERE for s in SERVICES if s.name != "merchant-service"}
    async with running_service("merchant-service", build_merchant, environ=environ) as address:
        assert address.public, "merchant-service has a merchant-facing port"
        yield address


@pytest.fixture
def pki_copy(tmp_path: Path) -> Path:
    """A copy of the session's test PKI (the same CA and its key) to issue odd leaves from."""
    return Path(shutil.copytree(servers.test_pki_dir(), tmp_path / "pki-copy"))


def _transfer(transaction_id: str) -> accounting_pb2.PostTransactionRequest:
    def posting(
        account: str, direction: accounting_pb2.EntryDirection.ValueType
    ) -> accounting_pb2.Posting:
        money = common_pb2.Money(amount_minor=1000, currency_code="EUR")
        return accounting_pb2.Posting(account_id=account, direction=direction, amount=money)

    return accounting_pb2.PostTransactionRequest(
        request_id=f"r-{transaction_id}",
        transaction_id=transaction_id,
        kind=accounting_pb2.TRANSACTION_KIND_PAYMENT,
        reference_id=transaction_id,
        postings=[
            posting("platform/psp_clearing", accounting_pb2.ENTRY_DIRECTION_DEBIT),
            posting(ACCOUNT, accounting_pb2.ENTRY_DIRECTION_CREDIT),
        ],
    )


async def _post(
    channel: aio.Channel, transaction_id: str, *, metadata: Sequence[tuple[str, str]] = ()
) -> accounting_pb2.PostTransactionResponse:
    stub = accounting_pb2_grpc.AccountingServiceStub(channel)
    return await stub.PostTransaction(
        _transfer(transaction_id), metadata=tuple(metadata), timeout=TIMEOUT_S
    )


async def _refused(call: Awaitable[object]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


def _status(error: aio.AioRpcError) -> status_pb2.Status:
    trailing = tuple(error.trailing_metadata() or ())
    return status_from_metadata(error.code(), error.details() or "", trailing)


async def _posted(address: str, transaction_id: str) -> bool:
    """Whether the ledger holds ``transaction_id``, asked as the operator."""
    async with mesh_channel(address) as channel:
        stub = accounting_pb2_grpc.AccountingServiceStub(channel)
        try:
            await stub.GetTransaction(
                accounting_pb2.GetTransactionRequest(transaction_id=transaction_id),
                timeout=TIMEOUT_S,
            )
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return False
    return True


def _named(identity: str) -> set[str]:
    """How a denial may name mesh identity ``identity``: the gate names callers it knows from
    the target's grants by mesh name, any other verified caller by its SPIFFE id."""
    return {identity, pki.spiffe_id(identity)}


def _channel(address: str, directory: Path, name: str) -> aio.Channel:
    """An mTLS channel presenting leaf ``name`` of ``directory``, trusting the mesh CA."""
    layout = pki.PkiLayout(directory=directory)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(servers.test_pki_dir() / "ca.pem").read_bytes(),
        private_key=layout.key(name).read_bytes(),
        certificate_chain=layout.cert(name).read_bytes(),
    )
    return aio.secure_channel(address, credentials)


async def _health(channel: aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
    )
    return int(reply.status)


# --- who may connect ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tls-without-client-certificate", "plaintext"])
async def test_mesh_port_refuses_a_caller_without_a_client_certificate(
    ledger: ServedAddress, transport: str
) -> None:
    async with mesh_channel(ledger, as_=GATEWAY) as channel:
        await _post(channel, "txn:admitted")
    opened = public_channel(ledger) if transport.startswith("tls") else aio.insecure_channel(ledger)
    async with opened as channel:
        error = await _refused(_post(channel, "txn:anonymous"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake, not the gate
        health = await _refused(_health(channel))
        assert health.code() == grpc.StatusCode.UNAVAILABLE
    assert not await _posted(ledger, "txn:anonymous")


async def test_certificate_of_another_ca_is_refused_even_for_a_granted_identity(
    ledger: ServedAddress, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger-pki"
    pki.ensure_dev_pki(stranger, [GATEWAY])  # the gateway's very SPIFFE id, another CA
    assert pki.spiffe_ids_of(pki.PkiLayout(directory=stranger).cert(GATEWAY).read_bytes()) == [
        pki.spiffe_id(GATEWAY)
    ]
    async with _channel(ledger, stranger, GATEWAY) as channel:
        error = await _refused(_post(channel, "txn:stranger"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    async with mesh_channel(ledger, as_=GATEWAY) as channel:
        await _post(channel, "txn:genuine")
    assert not await _posted(ledger, "txn:stranger")


async def test_expired_certificate_is_refused(ledger: ServedAddress, pki_copy: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    pki.issue_leaf_with(
        pki_copy,
        GATEWAY,
        spiffe=pki.spiffe_id(GATEWAY),
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    async with _channel(ledger, pki_copy, GATEWAY) as channel:
        error = await _refused(_post(channel, "txn:expired"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    async with mesh_channel(ledger, as_=GATEWAY) as channel:  # the same CA, valid leaf
        await _post(channel, "txn:valid")
    assert not await _posted(ledger, "txn:expired")


# --- who the caller is, and what it may call -----------------------------------------------


@pytest.mark.parametrize(
    ("caller", "method"),
    [(RISK, "PostTransaction"), (pki.OPERATOR, "PostTransaction"), (GATEWAY, "ListEntries")],
)
async def test_caller_not_granted_the_method_is_permission_denied_naming_both(
    ledger: ServedAddress, caller: str, method: str
) -> None:
    path = f"{SERVICE}/{method}"
    async with mesh_channel(ledger, as_=caller) as channel:
        call: aio.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
            path,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=lambda raw: raw,
        )
        request = (
            _transfer("txn:denied")
            if method == "PostTransaction"
            else accounting_pb2.ListEntriesRequest(account_id=ACCOUNT)
        )
        error = await _refused(call(request, timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(_status(error))
    assert info is not None
    assert (info.reason, info.domain) == ("CALLER_NOT_AUTHORIZED", ACCOUNTING)
    assert info.metadata["caller"] in _named(caller)
    assert info.metadata["method"] == path
    assert not await _posted(ledger, "txn:denied")


async def test_the_caller_is_the_ca_signed_spiffe_id_never_a_name_or_header(
    ledger: ServedAddress, pki_copy: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, spiffe: str) -> None:
        pki.issue_leaf_with(
            pki_copy,
            name,
            spiffe=spiffe,
            not_before=now,
            not_after=now + datetime.timedelta(hours=1),
        )

    # Signed by the mesh CA: its SPIFFE id is who the caller is, whatever the file is called.
    issue("claims-gateway", pki.spiffe_id(GATEWAY))
    async with _channel(ledger, pki_copy, "claims-gateway") as channel:
        await _post(channel, "txn:ca-signed-claim")
    assert await _posted(ledger, "txn:ca-signed-claim")

    # Named (CN, DNS SAN) payment-gateway, but its SPIFFE id says risk-service.
    issue(GATEWAY, pki.spiffe_id(RISK))
    # The gateway's id in another trust domain is not a mesh identity.
    foreign_id = pki.spiffe_id(GATEWAY, trust_domain="elsewhere.example")
    issue("foreign-domain", foreign_id)
    forged_headers = (
        ("x-forwarded-client-cert", f"URI={pki.spiffe_id(GATEWAY)}"),
        ("x-paymesh-caller", GATEWAY),
        ("peer_spiffe_id", pki.spiffe_id(GATEWAY)),
    )
    cases = [
        (_channel(ledger, pki_copy, GATEWAY), (), _named(RISK)),
        (_channel(ledger, pki_copy, "foreign-domain"), (), {foreign_id}),
        (mesh_channel(ledger, as_=RISK), forged_headers, _named(RISK)),
    ]
    for opened, metadata, seen_as in cases:
        async with opened as channel:
            error = await _refused(_post(channel, "txn:forged", metadata=metadata))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        info = error_info(_status(error))
        assert info is not None and info.reason == "CALLER_NOT_AUTHORIZED"
        assert info.metadata["caller"] in seen_as
    assert not await _posted(ledger, "txn:forged")


# --- health and reflection ---------------------------------------------------------------


async def test_health_is_served_to_every_verified_identity(ledger: ServedAddress) -> None:
    for name in [*(s.name for s in SERVICES), pki.OPERATOR]:
        async with mesh_channel(ledger, as_=name) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING, name


async def test_health_is_open_on_the_public_port_without_a_client_certificate(
    merchants: ServedAddress,
) -> None:
    async with public_channel(merchants.public) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def _list_services(channel: aio.Channel) -> list[str]:
    call = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    replies = [reply async for reply in call(iter(requests), timeout=TIMEOUT_S)]
    return [s.name for reply in replies for s in reply.list_services_response.service]


async def test_reflection_is_refused_on_the_public_port_and_served_to_the_operator(
    merchants: ServedAddress,
) -> None:
    async with mesh_channel(merchants) as channel:
        assert "paymesh.merchant.v1.MerchantService" in await _list_services(channel)
    async with public_channel(merchants.public) as channel:
        error = await _refused(_list_services(channel))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(_status(error))
    assert info is not None and info.reason == "CREDENTIALS_MISSING"


# --- load shedding -----------------------------------------------------------------------

MAX_IN_FLIGHT = 50
TOTAL_CALLS = 5_000
#: Streams one connection carries at once (ServerLimits.max_concurrent_streams).
STREAMS_PER_CONNECTION = 100
#: Calls beyond the cap sent at once: below gRPC core's own queue of calls not yet handed to
#: the server's loop (``grpc.server.max_pending_requests``, 1000), which resets what exceeds it.
WAVE = 500
#: The parked calls' fault delay (within the injector's bound) and their deadline: both far
#: beyond what the rest of the test takes; cancelling the calls ends them.
PARKED_DELAY_MS = 50_000
PARKED_TIMEOUT_S = 90.0
SHED_TIMEOUT_S = 30.0


def _capturing(faults: list[FaultInjector]) -> Callable[[ServiceContext], Served]:
    """accounting-service's builder, handing the test the service's fault injector."""

    def build(context: ServiceContext) -> Served:
        faults.append(context.faults)
        return build_accounting(context)

    return build


def _own_connection(address: str) -> aio.Channel:
    # Channels with equal arguments share one connection unless each has its own pool.
    return mesh_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def _balance(channel: aio.Channel, timeout_s: float) -> accounting_pb2.GetBalanceResponse:
    return await accounting_pb2_grpc.AccountingServiceStub(channel).GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=ACCOUNT, currency_code="EUR"),
        timeout=timeout_s,
    )


def _shed(outcome: object) -> str:
    """Why ``outcome`` is not a shed call (RESOURCE_EXHAUSTED, OVERLOADED, RetryInfo), or ""."""
    if not isinstance(outcome, aio.AioRpcError):
        return f"not refused: {outcome!r}"
    if outcome.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"{outcome.code().name}: {outcome.details()}"
    status = _status(outcome)
    info = error_info(status)
    if info is None or info.reason != "OVERLOADED":
        return f"RESOURCE_EXHAUSTED without reason OVERLOADED: {status}"
    if info.metadata.get("max_in_flight") != str(MAX_IN_FLIGHT):
        return f"names another cap: {dict(info.metadata)}"
    delay = retry_delay_of(status)
    if delay is None or delay <= 0:
        return "no RetryInfo"
    return ""


async def _probe(address: str) -> grpc.StatusCode:
    """One fresh GetTransaction (no fault) on a new channel: NOT_FOUND when served, else how
    it was refused (RESOURCE_EXHAUSTED only as a proper shed)."""
    async with mesh_channel(address) as channel:
        try:
            await accounting_pb2_grpc.AccountingServiceStub(channel).GetTransaction(
                accounting_pb2.GetTransactionRequest(transaction_id="txn:probe"),
                timeout=SHED_TIMEOUT_S,
            )
        except aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert not _shed(error), _shed(error)
            return error.code()
    return grpc.StatusCode.OK


async def _until_probe_is(address: str, code: grpc.StatusCode, within_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while (seen := await _probe(address)) != code:
        assert loop.time() < deadline, f"a fresh call still gets {seen.name}, not {code.name}"
        await asyncio.sleep(0.05)  # polling for the state, bounded by the deadline


@contextlib.asynccontextmanager
async def _capped_ledger(tmp_path: Path) -> AsyncIterator[tuple[ServedAddress, FaultInjector]]:
    """accounting-service with its in-flight cap at MAX_IN_FLIGHT, and its fault injector."""
    faults: list[FaultInjector] = []
    environ = {
        "PAYMESH_VAR_DIR": str(tmp_path),
        "ACCOUNTING_SERVICE_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
    }
    async with running_service(ACCOUNTING, _capturing(faults), environ=environ) as address:
        (injector,) = faults
        yield address, injector


@contextlib.asynccontextmanager
async def _parked(address: str, injector: FaultInjector) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """MAX_IN_FLIGHT GetBalance calls held in the service (a fault delays them), cancelled on
    exit; yields once all of them are in flight, i.e. a fresh call is refused."""
    injector.set([Fault(method=GET_BALANCE, delay_ms=PARKED_DELAY_MS)])
    async with _own_connection(address) as channel:
        parked = [
            asyncio.create_task(_balance(channel, PARKED_TIMEOUT_S)) for _ in range(MAX_IN_FLIGHT)
        ]
        try:
            await _until_probe_is(address, grpc.StatusCode.RESOURCE_EXHAUSTED)
            yield parked
        finally:
            for call in parked:
                call.cancel()
            await asyncio.gather(*parked, return_exceptions=True)


async def test_calls_beyond_the_in_flight_cap_are_shed_at_once_while_health_is_served(
    tmp_path: Path,
) -> None:
    async with _capped_ledger(tmp_path) as (address, injector):
        async with _parked(address, injector) as parked:
            channels = [_own_connection(address) for _ in range(WAVE // STREAMS_PER_CONNECTION)]
            try:
                wrong: list[str] = []
                for start in range(MAX_IN_FLIGHT, TOTAL_CALLS, WAVE):
                    count = min(WAVE, TOTAL_CALLS - start)
                    outcomes = await asyncio.gather(
                        *(
                            _balance(channels[i % len(channels)], SHED_TIMEOUT_S)
                            for i in range(count)
                        ),
                        return_exceptions=True,
                    )
                    # A call that waited for a slot would end DEADLINE_EXCEEDED, not shed.
                    wrong += filter(None, map(_shed, outcomes))
                assert not wrong, f"{len(wrong)} calls not shed, e.g. {wrong[:3]}"
                assert not any(call.done() for call in parked), "the admitted calls still hold"

                # Health is no call the cap counts; a fresh call is refused at once.
                async with mesh_channel(address) as channel:
                    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
                assert await _probe(address) == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                for channel in channels:
                    await channel.close()
        # The parked calls were cancelled, their server side ended with them: served again.
        await _until_probe_is(address, grpc.StatusCode.NOT_FOUND)


async def test_a_burst_of_calls_far_beyond_the_cap_is_shed_not_reset(tmp_path: Path) -> None:
    async with _capped_ledger(tmp_path) as (address, injector):
        async with _parked(address, injector):
            beyond = TOTAL_CALLS - MAX_IN_FLIGHT
            channels = [
                _own_connection(address) for _ in range(-(-beyond // STREAMS_PER_CONNECTION))
            ]
            try:
                outcomes = await asyncio.gather(
                    *(
                        _balance(channels[i // STREAMS_PER_CONNECTION], SHED_TIMEOUT_S)
                        for i in range(beyond)
                    ),
                    return_exceptions=True,
                )
            finally:
                for channel in channels:
                    await channel.close()
    wrong = list(filter(None, map(_shed, outcomes)))
    assert not wrong, f"{len(wrong)} of {beyond} calls not shed, e.g. {wrong[:3]}"


# --- bounded input -----------------------------------------------------------------------

MAX_RECEIVE_BYTES = 256 * 1024


async def test_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(
    ledger: ServedAddress,
) -> None:
    request = _transfer("txn:huge")
    request.reference_id = "x" * (MAX_RECEIVE_BYTES + 1024)
    async with mesh_channel(ledger, as_=GATEWAY) as channel:
        stub = accounting_pb2_grpc.AccountingServiceStub(channel)
        error = await _refused(stub.PostTransaction(request, timeout=TIMEOUT_S))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (error.details() or "")
        await _post(channel, "txn:after-huge")  # the same connection still serves
    assert not await _posted(ledger, "txn:huge")
    assert await _posted(ledger, "txn:after-huge")


async def test_oversized_metadata_is_refused_and_the_server_keeps_serving(
    ledger: ServedAddress,
) -> None:
    padding = (("x-padding", "y" * 64 * 1024),)
    async with mesh_channel(ledger, as_=GATEWAY) as channel:
        error = await _refused(_post(channel, "txn:huge-metadata", metadata=padding))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "metadata size exceeds" in (error.details() or "")
        await _post(channel, "txn:after-metadata")
    async with mesh_channel(ledger, as_=GATEWAY) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert not await _posted(ledger, "txn:huge-metadata")
    assert await _posted(ledger, "txn:after-metadata")
