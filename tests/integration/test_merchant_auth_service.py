"""merchant-auth-service through real gRPC on loopback, asking a real merchant-service.

Keys are issued only to active merchants, their secret is shown once and stored only as a
hash, authentication tells the merchant and whether it is active, revocation sticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from services.merchant.__main__ import build as build_merchant
from services.merchant_auth.__main__ import build as build_auth
from tests.servers import running_service


@dataclass(frozen=True, slots=True)
class Mesh:
    """Stubs of the two services under test and where merchant-auth keeps its data."""

    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub
    auth: merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub
    auth_database: Path


@contextlib.asynccontextmanager
async def _auth_over(
    merchant_address: str, tmp_path: Path, **environ: str
) -> AsyncIterator[merchant_auth_pb2_grpc.MerchantAuthServiceAsyncStub]:
    env = {"PAYMESH_VAR_DIR": str(tmp_path), "MERCHANT_SERVICE_ADDR": merchant_address, **environ}
    async with (
        running_service("merchant-auth-service", build_auth, environ=env) as address,
        aio.insecure_channel(address) as channel,
    ):
        yield merchant_auth_pb2_grpc.MerchantAuthServiceStub(channel)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with (
        running_service(
            "merchant-service", build_merchant, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
        ) as merchant_address,
        aio.insecure_channel(merchant_address) as channel,
        _auth_over(merchant_address, tmp_path) as auth,
    ):
        yield Mesh(
            merchant_pb2_grpc.MerchantServiceStub(channel),
            auth,
            tmp_path / "merchant-auth-service.db",
        )


async def _merchant(mesh: Mesh, request_id: str = "m1") -> merchant_pb2.Merchant:
    response = await mesh.merchants.CreateMerchant(
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


async def _suspend(mesh: Mesh, merchant_id: str) -> None:
    await mesh.merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id=f"suspend-{merchant_id}",
            merchant_id=merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
        )
    )


def _issue(
    merchant_id: str, request_id: str = "k1", label: str = "checkout"
) -> pb.IssueApiKeyRequest:
    return pb.IssueApiKeyRequest(request_id=request_id, merchant_id=merchant_id, label=label)


def _reason(error: aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


async def _authenticate_error(mesh: Mesh, api_key: str) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.AuthenticateApiKey(pb.AuthenticateApiKeyRequest(api_key=api_key))
    return caught.value


async def test_issued_key_authenticates_as_its_active_merchant(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert issued.secret.startswith(issued.api_key.prefix)
    assert issued.api_key.status == pb.API_KEY_STATUS_ACTIVE
    auth = await mesh.auth.AuthenticateApiKey(pb.AuthenticateApiKeyRequest(api_key=issued.secret))
    assert auth == pb.AuthenticateApiKeyResponse(
        merchant_id=merchant.merchant_id,
        key_id=issued.api_key.key_id,
        active=True,
        webhook_url=merchant.webhook_url,
    )


async def test_replayed_issue_returns_the_same_key_without_its_secret(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    first = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    again = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert first.secret
    assert again.secret == ""
    assert again.api_key == first.api_key
    listed = await mesh.auth.ListApiKeys(pb.ListApiKeysRequest(merchant_id=merchant.merchant_id))
    assert len(listed.api_keys) == 1


async def test_replayed_issue_replays_even_after_the_merchant_was_suspended(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    first = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    await _suspend(mesh, merchant.merchant_id)
    again = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert again.api_key == first.api_key


async def test_concurrent_issues_with_one_request_id_make_one_key_shown_once(
    mesh: Mesh,
) -> None:
    merchant = await _merchant(mesh)
    responses = await asyncio.gather(
        *(mesh.auth.IssueApiKey(_issue(merchant.merchant_id)) for _ in range(10))
    )
    assert len({r.api_key.key_id for r in responses}) == 1
    assert len([r for r in responses if r.secret]) == 1
    listed = await mesh.auth.ListApiKeys(pb.ListApiKeysRequest(merchant_id=merchant.merchant_id))
    assert len(listed.api_keys) == 1


async def test_request_id_reused_with_another_body_is_invalid_argument(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(_issue(merchant.merchant_id, label="other"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"


async def test_key_for_unknown_merchant_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(_issue("m_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _reason(caught.value) == "MERCHANT_NOT_FOUND"


async def test_key_for_suspended_merchant_is_failed_precondition(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    await _suspend(mesh, merchant.merchant_id)
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value) == "MERCHANT_INACTIVE"


async def test_key_of_a_merchant_suspended_later_authenticates_as_inactive(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    await _suspend(mesh, merchant.merchant_id)
    auth = await mesh.auth.AuthenticateApiKey(pb.AuthenticateApiKeyRequest(api_key=issued.secret))
    assert auth.merchant_id == merchant.merchant_id
    assert auth.active is False


async def test_secret_is_stored_nowhere_in_the_database(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    body = issued.secret.removeprefix(issued.api_key.prefix + "_")
    with sqlite3.connect(mesh.auth_database) as conn:
        dump = "\n".join(conn.iterdump()).encode()
        blobs = b"".join(
            row[0] or b"" for row in conn.execute("SELECT response FROM idempotency_keys")
        )
    assert body.encode() not in dump + blobs


@pytest.mark.parametrize("api_key", ["", "garbage", "sk_live_abc", "Bearer sk_0123456789abcdef_x"])
async def test_malformed_key_is_unauthenticated_api_key_invalid(mesh: Mesh, api_key: str) -> None:
    error = await _authenticate_error(mesh, api_key)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(error) == "API_KEY_INVALID"


async def test_wrong_secret_for_a_real_key_is_api_key_invalid(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    last = issued.secret[-1]
    forged = issued.secret[:-1] + ("A" if last != "A" else "B")
    error = await _authenticate_error(mesh, forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(error) == "API_KEY_INVALID"
    assert issued.secret not in (error.details() or "")


async def test_unknown_key_is_api_key_invalid(mesh: Mesh) -> None:
    error = await _authenticate_error(mesh, "sk_0123456789abcdef_" + "A" * 43)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(error) == "API_KEY_INVALID"


async def test_revoked_key_is_api_key_revoked(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    revoked = await mesh.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="v1", key_id=issued.api_key.key_id, reason="leaked")
    )
    assert revoked.api_key.status == pb.API_KEY_STATUS_REVOKED
    assert revoked.api_key.HasField("revoke_time")
    error = await _authenticate_error(mesh, issued.secret)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(error) == "API_KEY_REVOKED"


async def test_revoking_a_revoked_key_keeps_the_first_revocation(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    first = await mesh.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="v1", key_id=issued.api_key.key_id)
    )
    second = await mesh.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="v2", key_id=issued.api_key.key_id)
    )
    assert second.api_key == first.api_key


async def test_revoking_an_unknown_key_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.RevokeApiKey(pb.RevokeApiKeyRequest(request_id="v1", key_id="key_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_keys_list_newest_first_in_pages_without_secrets(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    other = await _merchant(mesh, "m2")
    issued = [
        (await mesh.auth.IssueApiKey(_issue(merchant.merchant_id, f"k{i}", f"key {i}"))).api_key
        for i in range(5)
    ]
    await mesh.auth.IssueApiKey(_issue(other.merchant_id, "k-other"))
    seen: list[pb.ApiKey] = []
    token = ""
    while True:
        page = await mesh.auth.ListApiKeys(
            pb.ListApiKeysRequest(merchant_id=merchant.merchant_id, page_size=2, page_token=token)
        )
        seen.extend(page.api_keys)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(issued))


async def test_listing_keys_without_a_merchant_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.ListApiKeys(pb.ListApiKeysRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _authenticate_after_merchant_service_stops(
    tmp_path: Path, **auth_environ: str
) -> pb.AuthenticateApiKeyResponse:
    """Issue and authenticate a key, stop merchant-service, then authenticate again."""
    merchant_service = contextlib.AsyncExitStack()
    merchant_address = await merchant_service.enter_async_context(
        running_service(
            "merchant-service", build_merchant, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
        )
    )
    channel = await merchant_service.enter_async_context(aio.insecure_channel(merchant_address))
    async with _auth_over(merchant_address, tmp_path, **auth_environ) as auth:
        mesh = Mesh(merchant_pb2_grpc.MerchantServiceStub(channel), auth, tmp_path)
        try:
            merchant = await _merchant(mesh)
            issued = await auth.IssueApiKey(_issue(merchant.merchant_id))
            request = pb.AuthenticateApiKeyRequest(api_key=issued.secret)
            await auth.AuthenticateApiKey(request)
        finally:
            await merchant_service.aclose()
        return await auth.AuthenticateApiKey(request)


async def test_authentication_uses_the_last_answer_while_merchant_service_is_down(
    tmp_path: Path,
) -> None:
    auth = await _authenticate_after_merchant_service_stops(tmp_path)
    assert auth.active is True


async def test_authentication_is_unavailable_once_the_last_answer_is_too_old(
    tmp_path: Path,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await _authenticate_after_merchant_service_stops(
            tmp_path, MERCHANT_AUTH_SERVICE_MERCHANT_STALE_S="0"
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
