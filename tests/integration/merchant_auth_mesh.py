"""merchant-auth-service and the merchant-service it asks, on loopback with mTLS, for its tests.

``start_auth_mesh`` serves both on the test harness (``auth_mesh`` on a harness of its own);
stubs call each method as an identity the topology grants it (the operator issues keys, a
mesh service authenticates them). The helpers onboard a merchant, issue a key and
authenticate the way a merchant-facing service does (bearer metadata plus the forwarded
client peer), and read the ErrorInfo and RetryInfo of a refusal.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.rpc import error_details_pb2
from grpc import aio

from interceptors.errors import error_info, retry_delay_of
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from services.merchant.__main__ import build as build_merchant
from services.merchant_auth.__main__ import build as build_auth
from services.mesh.bootstrap import Builder
from tests.servers import ServicesUnderTest, mesh_channel, rich_status_of, services_under_test

#: The address a test's mesh caller forwards for its merchant unless told otherwise.
MERCHANT_PEER = "ipv4:192.0.2.10:51000"
#: A mesh identity the topology grants AuthenticateApiKey.
AUTHENTICATING_SERVICE = "payment-gateway"


@dataclass(frozen=True, slots=True)
class Mesh:
    """Stubs of the two services under test and where merchant-auth keeps its data."""

    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub
    auth: merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub
    auth_address: str
    var_dir: Path

    @property
    def auth_database(self) -> Path:
        """merchant-auth's SQLite file."""
        return self.var_dir / "merchant-auth-service.db"


AUTH = "merchant-auth-service"


async def start_auth_mesh(
    services: ServicesUnderTest,
    *,
    environ: Mapping[str, str] | None = None,
    build: Builder = build_auth,
) -> Mesh:
    """merchant-service, then merchant-auth-service (with ``environ`` and ``build``) among
    ``services``."""
    merchant_address = await services.start("merchant-service", build_merchant)
    auth_address = await services.start(AUTH, build, environ=environ)
    return Mesh(
        await services.stub(
            merchant_address, merchant_pb2_grpc.MerchantServiceStub, "merchant-service"
        ),
        await services.stub(auth_address, merchant_auth_pb2_grpc.MerchantAuthServiceStub, AUTH),
        str(auth_address),
        services.var_dir,
    )


@contextlib.asynccontextmanager
async def merchant_service(
    var_dir: Path,
) -> AsyncIterator[tuple[str, merchant_pb2_grpc.MerchantServiceAsyncStub]]:
    """merchant-service on loopback (a harness of its own): its address and a stub of it."""
    async with services_under_test(var_dir) as services:
        address = await services.start("merchant-service", build_merchant)
        yield (
            address,
            await services.stub(address, merchant_pb2_grpc.MerchantServiceStub, "merchant-service"),
        )


@contextlib.asynccontextmanager
async def auth_service(
    merchant_address: str,
    var_dir: Path,
    *,
    environ: Mapping[str, str] | None = None,
    build: Builder = build_auth,
) -> AsyncIterator[tuple[merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub, str]]:
    """merchant-auth-service on loopback over ``merchant_address`` (a harness of its own):
    a stub and its address. A second one on the same ``var_dir`` is a restart."""
    async with services_under_test(
        var_dir, environ={"MERCHANT_SERVICE_ADDR": merchant_address}
    ) as services:
        address = await services.start(AUTH, build, environ=environ)
        yield (
            await services.stub(address, merchant_auth_pb2_grpc.MerchantAuthServiceStub, AUTH),
            str(address),
        )


@contextlib.asynccontextmanager
async def auth_mesh(
    var_dir: Path, *, environ: Mapping[str, str] | None = None, build: Builder = build_auth
) -> AsyncIterator[Mesh]:
    """Both services (:func:`start_auth_mesh`) on a harness of their own, for the block."""
    async with services_under_test(var_dir) as services:
        yield await start_auth_mesh(services, environ=environ, build=build)


def authenticating_channel(address: str) -> aio.Channel:
    """A raw mTLS channel to merchant-auth as a service granted AuthenticateApiKey."""
    return mesh_channel(address, as_=AUTHENTICATING_SERVICE)


async def create_merchant(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub, request_id: str = "m1"
) -> merchant_pb2.Merchant:
    """Onboard an active merchant."""
    response = await merchants.CreateMerchant(
        merchant_pb2.CreateMerchantRequest(
            request_id=request_id,
            name="Kaffeehaus Zentral",
            email="billing@kaffeehaus.example",
            country_code="AT",
            default_currency_code="EUR",
            webhook_url="https://kaffeehaus.example/hooks/paymesh",
        )
    )
    return response.merchant


def issue_request(
    merchant_id: str, request_id: str = "k1", label: str = "checkout"
) -> pb.IssueApiKeyRequest:
    """An IssueApiKey request."""
    return pb.IssueApiKeyRequest(request_id=request_id, merchant_id=merchant_id, label=label)


async def issued_key(mesh: Mesh, request_id: str = "m1") -> pb.IssueApiKeyResponse:
    """A new merchant and a key issued to it."""
    merchant = await create_merchant(mesh.merchants, request_id)
    return await mesh.auth.IssueApiKey(issue_request(merchant.merchant_id, f"k-{request_id}"))


def bearer(secret: str, *, peer: str | None = MERCHANT_PEER) -> tuple[tuple[str, str], ...]:
    """Call metadata of a mesh caller authenticating ``secret`` for the merchant at ``peer``."""
    metadata = [("authorization", f"Bearer {secret}")]
    if peer is not None:
        metadata.append(("x-paymesh-client-peer", peer))
    return tuple(metadata)


async def authenticate(
    auth: merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub,
    secret: str,
    *,
    peer: str | None = MERCHANT_PEER,
) -> pb.AuthenticateApiKeyResponse:
    """AuthenticateApiKey with ``secret`` as bearer metadata, forwarded from ``peer``."""
    return await auth.AuthenticateApiKey(
        pb.AuthenticateApiKeyRequest(), metadata=bearer(secret, peer=peer), timeout=10
    )


async def authenticate_error(
    auth: merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub,
    secret: str,
    *,
    peer: str | None = MERCHANT_PEER,
) -> aio.AioRpcError:
    """The error AuthenticateApiKey fails with (the test fails if it succeeds)."""
    with pytest.raises(aio.AioRpcError) as caught:
        await authenticate(auth, secret, peer=peer)
    return caught.value


def error_metadata(error: aio.AioRpcError) -> dict[str, str]:
    """ErrorInfo.metadata of a failed call."""
    info: error_details_pb2.ErrorInfo | None = error_info(rich_status_of(error))
    return dict(info.metadata) if info is not None else {}


def retry_delay_s(error: aio.AioRpcError) -> float | None:
    """google.rpc.RetryInfo's delay of a failed call, in seconds."""
    return retry_delay_of(rich_status_of(error))
