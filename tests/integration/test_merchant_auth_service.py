"""merchant-auth-service through real gRPC on loopback, asking a real merchant-service.

Keys are issued only to active merchants, their secret is shown once and stored only as a
peppered HMAC digest; authentication reads the secret from bearer metadata only, tells the
merchant and whether it is active, and revocation sticks. Legacy scrypt rows still verify.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio

from paymesh.merchant.v1 import merchant_pb2
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from services.merchant_auth.config import CACHE_VAR
from services.mesh.bootstrap import StartupError
from tests.integration.merchant_auth_mesh import (
    AUTH,
    Mesh,
    auth_service,
    authenticate,
    authenticate_error,
    authenticating_channel,
    create_merchant,
    issue_request,
    issued_key,
    merchant_service,
    start_auth_mesh,
)
from tests.servers import ServicesUnderTest, error_reason, services_under_test

AUTHENTICATE = "/paymesh.merchant_auth.v1.MerchantAuthService/AuthenticateApiKey"


@pytest.fixture
async def mesh(services: ServicesUnderTest) -> Mesh:
    # These tests see a suspension on the very next authentication; the cached path (and its
    # bound) is test_merchant_auth_cache's.
    return await start_auth_mesh(services, environ={CACHE_VAR: "0"})


async def _merchant(mesh: Mesh, request_id: str = "m1") -> merchant_pb2.Merchant:
    return await create_merchant(mesh.merchants, request_id)


async def _suspend(mesh: Mesh, merchant_id: str) -> None:
    await mesh.merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id=f"suspend-{merchant_id}",
            merchant_id=merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
        )
    )


_issue = issue_request


def _stored_hash(mesh: Mesh, key_id: str) -> str:
    with contextlib.closing(sqlite3.connect(mesh.auth_database)) as conn:
        row = conn.execute(
            "SELECT secret_hash FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
    return str(row[0])


async def test_issued_key_authenticates_as_its_active_merchant(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert issued.secret.startswith(issued.api_key.prefix)
    assert issued.api_key.status == pb.API_KEY_STATUS_ACTIVE
    auth = await authenticate(mesh.auth, issued.secret)
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
    mesh: Mesh, engine: str
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
    assert error_reason(caught.value) == "IDEMPOTENCY_KEY_REUSED"


async def test_key_for_unknown_merchant_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(_issue("m_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "MERCHANT_NOT_FOUND"


async def test_key_for_suspended_merchant_is_failed_precondition(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    await _suspend(mesh, merchant.merchant_id)
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MERCHANT_INACTIVE"


async def test_key_of_a_merchant_suspended_later_authenticates_as_inactive(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    await _suspend(mesh, merchant.merchant_id)
    auth = await authenticate(mesh.auth, issued.secret)
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


@pytest.mark.parametrize("api_key", ["garbage", "sk_live_abc", "Bearer sk_0123456789abcdef_x"])
async def test_malformed_key_is_unauthenticated_api_key_invalid(mesh: Mesh, api_key: str) -> None:
    error = await authenticate_error(mesh.auth, api_key)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_INVALID"


async def test_wrong_secret_for_a_real_key_is_api_key_invalid(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    last = issued.secret[-1]
    forged = issued.secret[:-1] + ("A" if last != "A" else "B")
    error = await authenticate_error(mesh.auth, forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_INVALID"
    assert issued.secret not in (error.details() or "")


async def test_unknown_key_is_api_key_invalid(mesh: Mesh) -> None:
    error = await authenticate_error(mesh.auth, "sk_0123456789abcdef_" + "A" * 43)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_INVALID"


async def test_revoked_key_is_api_key_revoked(mesh: Mesh) -> None:
    merchant = await _merchant(mesh)
    issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
    revoked = await mesh.auth.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id="v1", key_id=issued.api_key.key_id, reason="leaked")
    )
    assert revoked.api_key.status == pb.API_KEY_STATUS_REVOKED
    assert revoked.api_key.HasField("revoke_time")
    error = await authenticate_error(mesh.auth, issued.secret)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_REVOKED"


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
    async with services_under_test(tmp_path) as services:
        mesh = await start_auth_mesh(services, environ=auth_environ)
        merchant = await create_merchant(mesh.merchants)
        issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
        await authenticate(mesh.auth, issued.secret)
        await services.stop("merchant-service")
        return await authenticate(mesh.auth, issued.secret)


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


# --- The secret travels only as bearer metadata --------------------------------------------


def test_the_request_has_no_body_field_for_the_secret_and_reserves_the_old_one() -> None:
    message = descriptor_pb2.DescriptorProto()
    pb.AuthenticateApiKeyRequest.DESCRIPTOR.CopyToProto(message)
    assert list(message.field) == []
    assert [(r.start, r.end) for r in message.reserved_range] == [(1, 2)]
    assert list(message.reserved_name) == ["api_key"]


async def test_a_secret_in_the_old_body_field_is_credentials_missing(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    # What an old client sends: field 1 (length-delimited) holding the secret, no metadata.
    secret = issued.secret.encode()
    old_body = bytes([0x0A, len(secret)]) + secret
    async with authenticating_channel(mesh.auth_address) as channel:
        call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(AUTHENTICATE)
        with pytest.raises(aio.AioRpcError) as caught:
            await call(old_body, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "CREDENTIALS_MISSING"
    assert issued.secret not in (caught.value.details() or "")


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer "),),
        (("authorization", "{secret}"),),
        (("authorization", "Basic {secret}"),),
        (("authorization", "Bearer {secret}"), ("authorization", "Bearer {secret}")),
        (("x-api-key", "{secret}"),),
    ],
    ids=["none", "empty-bearer", "no-scheme", "basic", "twice", "other-header"],
)
async def test_missing_or_malformed_authorization_is_credentials_missing(
    mesh: Mesh, metadata: tuple[tuple[str, str], ...]
) -> None:
    issued = await issued_key(mesh)
    sent = tuple((key, value.format(secret=issued.secret)) for key, value in metadata)
    with pytest.raises(aio.AioRpcError) as caught:
        await mesh.auth.AuthenticateApiKey(pb.AuthenticateApiKeyRequest(), metadata=sent)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "CREDENTIALS_MISSING"
    assert issued.secret not in (caught.value.details() or "")


async def test_the_bearer_scheme_name_is_case_insensitive(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    auth = await mesh.auth.AuthenticateApiKey(
        pb.AuthenticateApiKeyRequest(), metadata=(("authorization", f"bearer {issued.secret}"),)
    )
    assert auth.key_id == issued.api_key.key_id


async def test_no_secret_reaches_the_logs(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    issued = await issued_key(mesh)
    forged = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    caplog.set_level(logging.DEBUG)
    await authenticate(mesh.auth, issued.secret)
    await authenticate_error(mesh.auth, forged)
    await authenticate_error(mesh.auth, "sk_not-a-key")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "AuthenticateApiKey" in logged  # the access log did see the calls
    body = issued.secret.removeprefix(issued.api_key.prefix + "_")
    for text in (body, forged.removeprefix(issued.api_key.prefix + "_"), "sk_not-a-key"):
        assert text not in logged


# --- Stored form: HMAC-SHA256 under the pepper; legacy scrypt rows upgrade ------------------


async def test_new_keys_are_stored_as_tagged_hmac_sha256_digests(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    scheme, _, digest = _stored_hash(mesh, issued.api_key.key_id).partition("$")
    assert scheme == "hmac-sha256"
    assert len(base64.b64decode(digest)) == 32


def _legacy_scrypt_hash(secret: str) -> str:
    """A hash as the scrypt-era service wrote it: ``scrypt$n$r$p$salt$digest`` (base64)."""
    salt = secrets.token_bytes(16)
    n, r, p = 2**14, 8, 1
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=32
    )
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return "$".join(("scrypt", str(n), str(r), str(p), *encoded))


def _store_legacy_hash(mesh: Mesh, key_id: str, secret: str) -> str:
    legacy = _legacy_scrypt_hash(secret)
    with contextlib.closing(sqlite3.connect(mesh.auth_database)) as conn, conn:
        conn.execute("UPDATE api_keys SET secret_hash = ? WHERE key_id = ?", (legacy, key_id))
    return legacy


async def test_a_legacy_scrypt_row_still_verifies_and_is_upgraded_to_hmac(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    key_id = issued.api_key.key_id
    _store_legacy_hash(mesh, key_id, issued.secret)
    first = await authenticate(mesh.auth, issued.secret)
    assert first.key_id == key_id
    assert _stored_hash(mesh, key_id).startswith("hmac-sha256$")
    again = await authenticate(mesh.auth, issued.secret)
    assert again == first


async def test_a_wrong_secret_leaves_a_legacy_row_as_it_was(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    key_id = issued.api_key.key_id
    legacy = _store_legacy_hash(mesh, key_id, issued.secret)
    forged = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    error = await authenticate_error(mesh.auth, forged)
    assert error_reason(error) == "API_KEY_INVALID"
    assert _stored_hash(mesh, key_id) == legacy


# --- The pepper: from a named file, or generated once (0600) and reused --------------------


async def test_the_generated_pepper_is_private_and_reused_across_restarts(
    tmp_path: Path,
) -> None:
    pepper_path = tmp_path / "merchant-auth-service.pepper"
    async with merchant_service(tmp_path) as (merchant_address, merchants):
        async with auth_service(merchant_address, tmp_path) as (auth, _):
            merchant = await create_merchant(merchants)
            issued = await auth.IssueApiKey(_issue(merchant.merchant_id))
        pepper = pepper_path.read_bytes()
        assert len(pepper) == 32
        assert stat.S_IMODE(pepper_path.stat().st_mode) == 0o600
        async with auth_service(merchant_address, tmp_path) as (auth, _):
            restarted = await authenticate(auth, issued.secret)
        assert restarted.key_id == issued.api_key.key_id
        assert pepper_path.read_bytes() == pepper


async def _issue_then_authenticate_with(
    tmp_path: Path, first_pepper: Path, second_pepper: Path
) -> aio.AioRpcError | pb.AuthenticateApiKeyResponse:
    """Issue a key under ``first_pepper``, restart merchant-auth on the same data under
    ``second_pepper``, then authenticate the key."""
    async with services_under_test(tmp_path) as services:
        env = {"MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE": str(first_pepper)}
        mesh = await start_auth_mesh(services, environ=env)
        merchant = await create_merchant(mesh.merchants)
        issued = await mesh.auth.IssueApiKey(_issue(merchant.merchant_id))
        env = {"MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE": str(second_pepper)}
        restarted = await services.restart(AUTH, environ=env)
        auth = await services.stub(restarted, merchant_auth_pb2_grpc.MerchantAuthServiceStub, AUTH)
        try:
            return await authenticate(auth, issued.secret)
        except aio.AioRpcError as error:
            return error


def _pepper_file(path: Path) -> Path:
    path.write_bytes(secrets.token_bytes(48))
    path.chmod(0o600)
    return path


async def test_a_configured_pepper_file_is_used_instead_of_generating_one(
    tmp_path: Path,
) -> None:
    pepper = _pepper_file(tmp_path / "mounted.pepper")
    result = await _issue_then_authenticate_with(tmp_path, pepper, pepper)
    assert isinstance(result, pb.AuthenticateApiKeyResponse)
    assert not (tmp_path / "merchant-auth-service.pepper").exists()


async def test_keys_do_not_verify_under_another_pepper(tmp_path: Path) -> None:
    first, second = _pepper_file(tmp_path / "a.pepper"), _pepper_file(tmp_path / "b.pepper")
    result = await _issue_then_authenticate_with(tmp_path, first, second)
    assert isinstance(result, aio.AioRpcError)
    assert error_reason(result) == "API_KEY_INVALID"


@pytest.mark.parametrize("content", [None, b"too short"], ids=["missing", "short"])
async def test_an_unusable_pepper_file_stops_start_up_naming_the_variable(
    tmp_path: Path, content: bytes | None
) -> None:
    pepper = tmp_path / "mounted.pepper"
    if content is not None:
        pepper.write_bytes(content)
    env = {"MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE": str(pepper)}
    with pytest.raises(StartupError, match="MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE"):
        async with auth_service("127.0.0.1:1", tmp_path, environ=env):
            pass
