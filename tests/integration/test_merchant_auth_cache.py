"""merchant-auth-service with its merchant cache on: what is cached and what never is.

With MERCHANT_AUTH_SERVICE_MERCHANT_CACHE_S set, authentication answers from merchant-service's
last word for that long (a suspension shows within the bound, tested with a fake clock in
tests/unit/test_merchant_auth_cache.py), but a key is read from merchant-auth's own database
on every call: a revoked key stops working on the very next authentication.
"""

from __future__ import annotations

import grpc
import pytest

from paymesh.merchant.v1 import merchant_pb2
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from services.merchant_auth.config import CACHE_VAR
from tests.integration.merchant_auth_mesh import (
    Mesh,
    authenticate,
    authenticate_error,
    issued_key,
    start_auth_mesh,
)
from tests.servers import ServicesUnderTest, error_reason


@pytest.fixture
async def mesh(services: ServicesUnderTest) -> Mesh:
    # A bound far longer than the test, so whatever the cache holds is what answers.
    return await start_auth_mesh(services, environ={CACHE_VAR: "3600"})


async def test_a_revoked_key_fails_at_once_while_its_merchant_is_cached(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    assert (await authenticate(mesh.auth, issued.secret)).active is True
    await mesh.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="v1", key_id=issued.api_key.key_id, reason="leaked")
    )
    error = await authenticate_error(mesh.auth, issued.secret)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_REVOKED"


async def test_a_wrong_secret_fails_while_its_merchant_is_cached(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    await authenticate(mesh.auth, issued.secret)
    wrong = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    assert (await authenticate_error(mesh.auth, wrong)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_suspension_is_not_seen_before_the_bound_but_issuing_asks_afresh(
    mesh: Mesh,
) -> None:
    issued = await issued_key(mesh)
    merchant_id = issued.api_key.merchant_id
    await authenticate(mesh.auth, issued.secret)
    await mesh.merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id="suspend-1",
            merchant_id=merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
        )
    )
    # Within the bound the cached answer stands (the documented staleness) ...
    assert (await authenticate(mesh.auth, issued.secret)).active is True
    # ... but issuing a key never trusts the cache.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(pb.IssueApiKeyRequest(request_id="k2", merchant_id=merchant_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
