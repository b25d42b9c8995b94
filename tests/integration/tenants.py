"""Merchants with API keys, for tests of merchant-facing RPCs on a service's public port.

:func:`start_directory` (or :func:`merchant_directory`) serves merchant-service and
merchant-auth-service on loopback (the gate of a merchant-facing service checks keys at
merchant-auth, which asks merchant-service);
:meth:`Directory.onboard` creates a merchant and issues it a key as the operator would, and
:func:`merchant_stub` calls a public port as that merchant, the key in bearer metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from google.rpc import status_pb2
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, error_info
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from services.merchant.__main__ import build as build_merchant
from services.merchant_auth.__main__ import build as build_auth
from services.merchant_auth.config import CACHE_VAR
from services.merchant_auth.keys import SECRET_PREFIX
from tests.servers import ServicesUnderTest, bearer, public_channel, services_under_test

StubT = TypeVar("StubT")
#: Hex digits of a secret's public lookup part (``sk_<lookup>_<body>``).
_LOOKUP_LENGTH = 16


@dataclass(frozen=True, slots=True)
class Tenant:
    """An onboarded merchant and the secret of its API key."""

    merchant_id: str
    secret: str

    @property
    def key(self) -> tuple[tuple[str, str]]:
        """Call metadata carrying this merchant's API key."""
        return bearer(self.secret)

    @property
    def secret_body(self) -> str:
        """The part of the secret that is never public (after ``sk_<lookup>_``)."""
        return self.secret[len(SECRET_PREFIX) + _LOOKUP_LENGTH + 1 :]


@dataclass(slots=True)
class Directory:
    """merchant-service and merchant-auth-service running, with operator stubs to both."""

    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub
    auth: merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub
    merchant_address: str
    auth_address: str
    _onboarded: int = field(default=0)

    @property
    def environ(self) -> dict[str, str]:
        """What a merchant-facing service needs to check keys: merchant-auth's address."""
        return {"MERCHANT_AUTH_SERVICE_ADDR": self.auth_address}

    async def onboard(self, name: str = "Test Shop", *, webhook_url: str = "") -> Tenant:
        """A new active merchant with one API key, created as the operator."""
        self._onboarded += 1
        merchant = (
            await self.merchants.CreateMerchant(
                merchant_pb2.CreateMerchantRequest(
                    request_id=f"onboard-{self._onboarded}",
                    name=name,
                    email=f"shop{self._onboarded}@example.com",
                    country_code="DE",
                    default_currency_code="EUR",
                    webhook_url=webhook_url,
                )
            )
        ).merchant
        return Tenant(merchant.merchant_id, await self.issue_key(merchant.merchant_id))

    async def issue_key(self, merchant_id: str) -> str:
        """The secret of a further key of ``merchant_id``."""
        self._onboarded += 1
        issued = await self.auth.IssueApiKey(
            merchant_auth_pb2.IssueApiKeyRequest(
                request_id=f"key-{self._onboarded}", merchant_id=merchant_id, label="test"
            )
        )
        return issued.secret

    async def suspend(self, merchant_id: str) -> None:
        """Suspend ``merchant_id`` as the operator."""
        self._onboarded += 1
        await self.merchants.UpdateMerchantStatus(
            merchant_pb2.UpdateMerchantStatusRequest(
                request_id=f"suspend-{self._onboarded}",
                merchant_id=merchant_id,
                status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
                reason="fraud review",
            )
        )


async def start_directory(services: ServicesUnderTest) -> Directory:
    """merchant-service and merchant-auth-service among ``services``; every service started
    there after them gets both addresses (merchant-facing ones check keys at merchant-auth)."""
    merchant_address = await services.start("merchant-service", build_merchant)
    # Tests suspend a merchant and expect its very next call refused: no cached merchant
    # status (the cache and its bound are tested in test_merchant_auth_cache).
    auth_address = await services.start(
        "merchant-auth-service", build_auth, environ={CACHE_VAR: "0"}
    )
    return Directory(
        await services.stub(
            merchant_address, merchant_pb2_grpc.MerchantServiceStub, "merchant-service"
        ),
        await services.stub(
            auth_address, merchant_auth_pb2_grpc.MerchantAuthServiceStub, "merchant-auth-service"
        ),
        merchant_address,
        auth_address,
    )


@contextlib.asynccontextmanager
async def merchant_directory(var_dir: Path) -> AsyncIterator[Directory]:
    """merchant-service and merchant-auth-service over ``var_dir`` (:func:`start_directory`
    on a harness of their own).

    A merchant-service under test that also checks keys (its own merchant-facing methods) can
    run on the same ``var_dir``: it then shares this one's database, so merchant-auth sees the
    merchants it creates (the two cannot name each other's ephemeral ports up front).
    """
    async with services_under_test(var_dir) as services:
        yield await start_directory(services)


class _MerchantStub:
    """A stub whose every call carries one merchant's API key (unless it passes metadata)."""

    def __init__(self, stub: Any, secret: str) -> None:
        self._stub = stub
        self._key = bearer(secret)

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._stub, method)

        def with_key(request: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("metadata", self._key)
            return call(request, **kwargs)

        return with_key


@contextlib.asynccontextmanager
async def merchant_stub(
    public_address: str, stub_type: Callable[[aio.Channel], StubT], secret: str
) -> AsyncIterator[StubT]:
    """A stub over TLS (no client certificate) to ``public_address``, calling as the merchant
    whose key ``secret`` is."""
    async with public_channel(public_address) as channel:
        yield cast(StubT, _MerchantStub(stub_type(channel), secret))


def rich_status(error: aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried (empty if none)."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


def refusal(error: aio.AioRpcError, *, resource_id: str = "") -> tuple[object, ...]:
    """All a refusal tells the caller (code, message, ErrorInfo, other details), with
    ``resource_id`` written as ``<id>`` so refusals about two ids can be compared."""
    status = rich_status(error)
    info = error_info(status)

    def masked(text: str) -> str:
        return text.replace(resource_id, "<id>") if resource_id else text

    return (
        error.code().name,
        masked(error.details() or ""),
        info.reason if info is not None else "",
        info.domain if info is not None else "",
        {key: masked(value) for key, value in (info.metadata if info is not None else {}).items()},
        len(status.details),
    )
