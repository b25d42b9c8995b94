"""merchant-auth-service's verification limits through real gRPC on loopback (mTLS).

A flood of wrong secrets for a real key id is refused (TOO_MANY_FAILED_ATTEMPTS) while its
merchant keeps authenticating; a peer that keeps failing is refused for every key; more
verifications than the in-flight limit are shed at once (OVERLOADED). The limits run on a
fake clock, so every RetryInfo delay is exact and no test waits for a window to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from services.merchant_auth.__main__ import build as build_auth
from services.merchant_auth.keys import SecretVerifier, Verification
from services.mesh.bootstrap import StartupError
from tests.integration.merchant_auth_mesh import (
    MERCHANT_PEER,
    Mesh,
    auth_mesh,
    auth_service,
    authenticate,
    authenticate_error,
    error_metadata,
    issued_key,
    retry_delay_s,
)
from tests.servers import error_reason
from tests.unit.fakes import FakeClock

ATTACKER = "ipv4:198.51.100.7:40000"


class HeldVerifier:
    """The service's real verifier behind a gate the test opens; counts the calls waiting."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0
        self._inner: SecretVerifier | None = None

    def wrap(self, inner: SecretVerifier) -> SecretVerifier:
        """Hold ``inner`` (what the service would have used) behind the gate."""
        self._inner = inner
        return self

    async def verify(self, secret: str, stored: str) -> Verification:
        assert self._inner is not None
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await self._inner.verify(secret, stored)


@contextlib.asynccontextmanager
async def _limited_mesh(
    tmp_path: Path,
    clock: FakeClock,
    *,
    environ: Mapping[str, str] | None = None,
    held: HeldVerifier | None = None,
) -> AsyncIterator[Mesh]:
    build = functools.partial(
        build_auth, limits_clock=clock, wrap_verifier=held.wrap if held else None
    )
    async with auth_mesh(tmp_path, environ=environ, build=build) as mesh:
        yield mesh


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def mesh(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Mesh]:
    async with _limited_mesh(tmp_path, clock) as services:
        yield services


def _wrong_secret_for(issued: pb.IssueApiKeyResponse) -> str:
    """Another 256-bit body for the real (public) key id: what a guesser sends."""
    return f"{issued.api_key.prefix}_{secrets.token_urlsafe(32)}"


def _unknown_key() -> str:
    return f"sk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def _peer(index: int) -> str:
    return f"ipv4:203.0.113.{index % 250}:{40000 + index}"


def _assert_too_many(error: BaseException, *, retry_s: float, **metadata: str) -> None:
    assert isinstance(error, aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) == "TOO_MANY_FAILED_ATTEMPTS"
    assert retry_delay_s(error) == pytest.approx(retry_s)
    assert metadata.items() <= error_metadata(error).items()


def _assert_invalid(error: BaseException) -> None:
    assert isinstance(error, aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(error) == "API_KEY_INVALID"


async def _fail(mesh: Mesh, secret: str, times: int, *, peer: str | None = ATTACKER) -> None:
    for _ in range(times):
        _assert_invalid(await authenticate_error(mesh.auth, secret, peer=peer))


# --- Per key id -----------------------------------------------------------------------------


async def test_a_flood_of_wrong_secrets_for_a_real_key_leaves_its_merchant_authenticating(
    mesh: Mesh,
) -> None:
    issued = await issued_key(mesh)
    await authenticate(mesh.auth, issued.secret)  # the merchant's usual address
    # Three waves of 60 guesses, each from its own address (below the per-peer limit), with 10
    # real calls among them; a wave stays under a connection's concurrent-stream cap.
    outcomes: list[pb.AuthenticateApiKeyResponse | BaseException] = []
    for wave in range(3):
        guesses = [
            authenticate(mesh.auth, _wrong_secret_for(issued), peer=_peer(wave * 60 + i))
            for i in range(60)
        ]
        real = [authenticate(mesh.auth, issued.secret) for _ in range(10)]
        interleaved = [call for pair in zip(guesses[:10], real, strict=True) for call in pair]
        outcomes += await asyncio.gather(*interleaved, *guesses[10:], return_exceptions=True)
    answered = [o for o in outcomes if isinstance(o, pb.AuthenticateApiKeyResponse)]
    errors = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert len(answered) + len(errors) == len(outcomes)
    assert len(answered) == 30
    assert {o.key_id for o in answered} == {issued.api_key.key_id}
    invalid = [e for e in errors if error_reason(e) == "API_KEY_INVALID"]
    assert len(invalid) == 10  # the default key-id limit; after it, no verification work
    for error in errors:
        if error_reason(error) != "API_KEY_INVALID":
            _assert_too_many(error, retry_s=60.0, key_id=issued.api_key.key_id)


async def test_a_locked_key_refuses_a_peer_it_does_not_know_until_the_window_frees(
    mesh: Mesh, clock: FakeClock
) -> None:
    issued = await issued_key(mesh)
    for i in range(10):
        _assert_invalid(
            await authenticate_error(mesh.auth, _wrong_secret_for(issued), peer=_peer(i))
        )
    newcomer = "ipv4:192.0.2.99:5000"
    refused = await authenticate_error(mesh.auth, issued.secret, peer=newcomer)
    _assert_too_many(refused, retry_s=60.0, key_id=issued.api_key.key_id)
    clock.advance(45)
    refused = await authenticate_error(mesh.auth, issued.secret, peer=newcomer)
    _assert_too_many(refused, retry_s=15.0)
    clock.advance(15)
    assert (await authenticate(mesh.auth, issued.secret, peer=newcomer)).key_id


async def test_failures_for_one_key_do_not_lock_another(mesh: Mesh) -> None:
    first = await issued_key(mesh, "m1")
    second = await issued_key(mesh, "m2")
    for i in range(10):
        await authenticate_error(mesh.auth, _wrong_secret_for(first), peer=_peer(i))
    fresh_peer = "ipv4:192.0.2.77:5000"
    assert (await authenticate(mesh.auth, second.secret, peer=fresh_peer)).key_id


# --- Per peer -------------------------------------------------------------------------------


async def test_a_failing_peer_is_refused_for_every_key_until_its_window_frees(
    mesh: Mesh, clock: FakeClock
) -> None:
    issued = await issued_key(mesh)
    for _ in range(20):
        _assert_invalid(await authenticate_error(mesh.auth, _unknown_key(), peer=ATTACKER))
    refused = await authenticate_error(mesh.auth, issued.secret, peer=ATTACKER)
    _assert_too_many(refused, retry_s=60.0, peer="198.51.100.7")
    assert (await authenticate(mesh.auth, issued.secret, peer=MERCHANT_PEER)).key_id
    clock.advance(60)
    assert (await authenticate(mesh.auth, issued.secret, peer=ATTACKER)).key_id


async def test_a_peer_is_counted_by_address_whatever_its_port(mesh: Mesh) -> None:
    for port in range(20):
        peer = f"ipv4:198.51.100.7:{41000 + port}"
        _assert_invalid(await authenticate_error(mesh.auth, _unknown_key(), peer=peer))
    refused = await authenticate_error(mesh.auth, _unknown_key(), peer="ipv4:198.51.100.7:1")
    _assert_too_many(refused, retry_s=60.0, peer="198.51.100.7")


async def test_without_a_forwarded_peer_the_connection_peer_is_limited(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    await _fail(mesh, _unknown_key(), 20, peer=None)
    refused = await authenticate_error(mesh.auth, issued.secret, peer=None)
    _assert_too_many(refused, retry_s=60.0, peer="127.0.0.1")
    assert (await authenticate(mesh.auth, issued.secret, peer=MERCHANT_PEER)).key_id


async def test_successful_verifications_never_count_against_the_limits(mesh: Mesh) -> None:
    issued = await issued_key(mesh)
    for _ in range(30):  # above both the key-id (10) and the peer (20) limit
        await authenticate(mesh.auth, issued.secret)
    _assert_invalid(
        await authenticate_error(mesh.auth, _wrong_secret_for(issued), peer=MERCHANT_PEER)
    )


async def test_failure_limits_and_window_come_from_the_environment(
    tmp_path: Path, clock: FakeClock
) -> None:
    environ = {
        "MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT": "2",
        "MERCHANT_AUTH_SERVICE_PEER_FAILURE_LIMIT": "3",
        "MERCHANT_AUTH_SERVICE_FAILURE_WINDOW_S": "5",
    }
    async with _limited_mesh(tmp_path, clock, environ=environ) as mesh:
        issued = await issued_key(mesh)
        for i in range(2):
            await authenticate_error(mesh.auth, _wrong_secret_for(issued), peer=_peer(i))
        refused = await authenticate_error(mesh.auth, issued.secret, peer=_peer(99))
        _assert_too_many(refused, retry_s=5.0, key_id=issued.api_key.key_id)
        await _fail(mesh, _unknown_key(), 3)
        _assert_too_many(
            await authenticate_error(mesh.auth, _unknown_key(), peer=ATTACKER),
            retry_s=5.0,
            peer="198.51.100.7",
        )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "0"),
        ("MERCHANT_AUTH_SERVICE_PEER_FAILURE_LIMIT", "lots"),
        ("MERCHANT_AUTH_SERVICE_MAX_VERIFICATIONS_IN_FLIGHT", "-1"),
        ("MERCHANT_AUTH_SERVICE_FAILURE_WINDOW_S", "0"),
    ],
)
async def test_a_bad_limit_stops_start_up_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(StartupError, match=variable):
        async with auth_service("127.0.0.1:1", tmp_path, environ={variable: value}):
            pass


# --- Concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "limit", "retry_s"),
    [
        ({}, 16, 0.1),
        (
            {
                "MERCHANT_AUTH_SERVICE_MAX_VERIFICATIONS_IN_FLIGHT": "2",
                "MERCHANT_AUTH_SERVICE_OVERLOAD_RETRY_S": "0.5",
            },
            2,
            0.5,
        ),
    ],
    ids=["default", "configured"],
)
async def test_verifications_beyond_the_in_flight_limit_are_shed_at_once(
    tmp_path: Path, clock: FakeClock, environ: dict[str, str], limit: int, retry_s: float
) -> None:
    held = HeldVerifier()
    async with _limited_mesh(tmp_path, clock, environ=environ, held=held) as mesh:
        issued = await issued_key(mesh)
        in_flight = [
            asyncio.create_task(authenticate(mesh.auth, issued.secret)) for _ in range(limit)
        ]
        await _until(lambda: held.waiting == limit)
        shed = await authenticate_error(mesh.auth, issued.secret)
        assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(shed) == "OVERLOADED"
        assert retry_delay_s(shed) == pytest.approx(retry_s)
        held.gate.set()
        answered = await asyncio.gather(*in_flight)
        assert {a.key_id for a in answered} == {issued.api_key.key_id}
        assert (await authenticate(mesh.auth, issued.secret)).key_id == issued.api_key.key_id


async def _until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` on the loop until it holds (the test fails past ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the held calls arrive over the network
            await asyncio.sleep(0.005)
