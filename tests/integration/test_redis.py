"""Redis shared by replicas (``REDIS_URL``) against a real redis-server: caches, limits, outages.

Two replicas are two objects with clients of their own, or two service instances on one data
dir; either way only Redis joins them. A test that kills Redis starts its own redis-server;
the others share the session's, each under a key prefix of its own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interceptors.chain import build_client_chain
from interceptors.policy import PolicyConfig
from paymesh.merchant_auth.v1 import merchant_auth_pb2 as pb
from paymesh.merchant_auth.v1 import merchant_auth_pb2_grpc
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.channel_adapter.rates import Quote, RateCache
from services.merchant_auth.__main__ import build as build_auth
from services.merchant_auth.keys import SecretVerifier, Verification
from services.merchant_auth.limits import VerificationGuard, VerificationLimits
from services.merchant_auth.shared_limits import SharedVerificationGuard
from services.mesh import pki
from services.risk.geo import GeoLookup
from services.storage.shared_state import (
    KEY_PREFIX_VAR,
    REDIS_URL_VAR,
    SharedCache,
    SharedState,
    SharedStateError,
)
from services.tools.launcher import LocalEngine
from services.tools.redis_server import RedisEngine, RedisServer
from tests.conftest import require_redis_server
from tests.integration.merchant_auth_mesh import (
    AUTH,
    authenticate,
    authenticate_error,
    issued_key,
    start_auth_mesh,
)
from tests.integration.test_payment_gateway_service import Mesh, _create, _until, mesh
from tests.servers import (
    ServicesUnderTest,
    error_reason,
    mesh_channel,
    running_sandbox,
    services_under_test,
)

__all__ = ["mesh"]  # the payment mesh fixture, started here with REDIS_URL set

AUTH_SERVICE = "paymesh.merchant_auth.v1.MerchantAuthService"


@contextlib.asynccontextmanager
async def _replicas(environ: dict[str, str], count: int = 2) -> AsyncIterator[list[SharedState]]:
    """``count`` SharedStates on one Redis and prefix, each with its own connection pool."""
    states = [
        SharedState(environ[REDIS_URL_VAR], prefix=environ[KEY_PREFIX_VAR]) for _ in range(count)
    ]
    try:
        yield states
    finally:
        for state in states:
            await state.close()


async def test_a_rate_fetched_by_one_replica_is_served_to_the_other_for_what_is_left_of_its_ttl(
    redis_environ: dict[str, str],
) -> None:
    fetched: list[tuple[str, str]] = []

    async def fetch(source: str, target: str) -> Quote:
        fetched.append((source, target))
        return Quote(source=source, target=target, rate=Decimal("1.0825"), as_of_s=1.5)

    async with _replicas(redis_environ) as (one, other):
        first = RateCache(fetch, ttl_s=60, shared=SharedCache(one, "channel-adapter", "rates"))
        second = RateCache(fetch, ttl_s=60, shared=SharedCache(other, "channel-adapter", "rates"))
        quote, cached = await first.get("EUR", "USD")
        assert (quote.rate, cached) == (Decimal("1.0825"), False)
        served, cached = await second.get("EUR", "USD")
        ttl_ms = await other._client.pttl(other.key("channel-adapter", "rates", "EUR:USD"))

    assert (served, cached) == (quote, True)
    assert fetched == [("EUR", "USD")]
    assert 0 < ttl_ms <= 60_000, "the entry keeps the TTL it was stored with"


async def test_a_geo_answer_looked_up_by_one_replica_is_served_to_the_other(
    redis_environ: dict[str, str],
) -> None:
    policy = PolicyConfig.from_mapping({"defaults": {"retry": {"max_attempts": 1}}})
    with running_sandbox() as (address, state):
        async with _replicas(redis_environ) as states:
            lookups = []
            for shared in states:
                chain = build_client_chain(caller="risk-service", config=policy)
                client = chain.http_client("geo-ip", f"http://{address}/geo-ip")
                lookups.append(
                    GeoLookup(client, shared=SharedCache(shared, "risk-service", "geo-ip"))
                )
            first = await lookups[0].lookup("192.0.2.1")
            second = await lookups[1].lookup("192.0.2.1")

    assert first.looked_up and second == first
    assert state.requests["geo-ip"] == 1


async def test_failure_limit_is_counted_across_replicas_not_per_replica(
    redis_environ: dict[str, str],
) -> None:
    limits = VerificationLimits(peer_failures=3, key_failures=100)
    async with _replicas(redis_environ) as states:
        guards = [
            SharedVerificationGuard(VerificationGuard(limits), s, service=AUTH) for s in states
        ]
        for attempt in range(3):
            guard = guards[attempt % 2]  # one, other, one: 3 in total, at most 2 on either
            assert await guard.refusal(peer="192.0.2.7", key_id=None) is None
            await guard.failed(peer="192.0.2.7", key_id=None)
        refusals = [await g.refusal(peer="192.0.2.7", key_id=None) for g in guards]
        others = [await g.refusal(peer="192.0.2.8", key_id=None) for g in guards]

    assert [r.subject if r else None for r in refusals] == ["peer", "peer"]
    assert all(0 < r.retry_after_s <= limits.window_s for r in refusals if r)
    assert others == [None, None], "another peer is not locked"
    # Neither replica alone saw 3 failures: without Redis neither would refuse.
    assert [g.local.refusal(peer="192.0.2.7", key_id=None) for g in guards] == [None, None]


class _CountingVerifier:
    """The real verifier, counting the verifications it made."""

    def __init__(self, inner: SecretVerifier) -> None:
        self.inner = inner
        self.calls = 0

    async def verify(self, secret: str, stored: str) -> Verification:
        self.calls += 1
        return await self.inner.verify(secret, stored)


async def test_a_key_verified_by_one_replica_is_served_to_the_other_until_revoked(
    tmp_path: Path, redis_environ: dict[str, str]
) -> None:
    verifiers: list[_CountingVerifier] = []

    def counting(inner: SecretVerifier) -> SecretVerifier:
        verifiers.append(_CountingVerifier(inner))
        return verifiers[-1]

    build = functools.partial(build_auth, wrap_verifier=counting)
    async with services_under_test(tmp_path, environ=redis_environ) as services:
        mesh_ = await start_auth_mesh(services, build=build)
        key = await issued_key(mesh_)
        await authenticate(mesh_.auth, key.secret)
        async with services.instance(AUTH, build=build) as second_address:
            second = await services.stub(
                second_address, merchant_auth_pb2_grpc.MerchantAuthServiceStub, AUTH
            )
            answer = await authenticate(second, key.secret)
            assert answer.key_id == key.api_key.key_id
            assert [v.calls for v in verifiers] == [1, 0], "the second replica used the first's"

            await mesh_.auth.RevokeApiKey(
                pb.RevokeApiKeyRequest(request_id="r1", key_id=key.api_key.key_id)
            )
            error = await authenticate_error(second, key.secret)

    assert "revoked" in (error.details() or "")


async def test_two_merchant_auth_replicas_lock_a_guessing_peer_after_the_limit_in_total(
    tmp_path: Path, redis_environ: dict[str, str]
) -> None:
    environ = {**redis_environ, "MERCHANT_AUTH_SERVICE_PEER_FAILURE_LIMIT": "4"}
    async with services_under_test(tmp_path, environ=environ) as services:
        first = (await start_auth_mesh(services)).auth
        async with services.instance(AUTH) as second_address:
            second = await services.stub(
                second_address, merchant_auth_pb2_grpc.MerchantAuthServiceStub, AUTH
            )
            guess = "sk_0123456789abcdef_" + "A" * 43
            reasons = [
                error_reason(await authenticate_error(replica, guess, peer="ipv4:198.51.100.9:1"))
                for replica in (first, second) * 3
            ]

    # 4 verifications in total (2 on each replica), then both refuse without verifying.
    assert reasons == ["API_KEY_INVALID"] * 4 + ["TOO_MANY_FAILED_ATTEMPTS"] * 2


async def _health(channel: aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


async def _redis_entry(channel: aio.Channel) -> mesh_pb2.Dependency:
    report = await mesh_pb2_grpc.DiagnosticsServiceStub(channel).GetDiagnostics(
        mesh_pb2.GetDiagnosticsRequest(), timeout=5
    )
    return next(d for d in report.dependencies if d.name == "redis")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, since it is killed."""
    require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture
async def services(tmp_path: Path, own_redis: RedisServer) -> AsyncIterator[ServicesUnderTest]:
    """The payment mesh's harness with every service on ``own_redis``."""
    environ = {
        REDIS_URL_VAR: own_redis.url,
        KEY_PREFIX_VAR: "paymesh",
        "PAYMESH_READINESS_INTERVAL_S": "0.25",
    }
    async with services_under_test(tmp_path, environ=environ) as harness:
        yield harness


async def test_payments_succeed_after_redis_is_killed_and_health_shows_it_without_liveness(
    mesh: Mesh, own_redis: RedisServer
) -> None:
    before = (await mesh.gateway.CreatePayment(_create(mesh, "pay-before"))).payment
    auth_address = mesh.services.addresses[AUTH]
    async with mesh_channel(auth_address, as_=pki.OPERATOR) as channel:
        assert (await _redis_entry(channel)).health == mesh_pb2.DEPENDENCY_HEALTH_SERVING
        own_redis.kill()

        # The merchant's key, its merchant, the geo-IP answer: all read from their sources.
        after = (await mesh.gateway.CreatePayment(_create(mesh, "pay-after"))).payment

        async def redis_not_serving() -> bool:
            return bool(
                await _health(channel, "redis") == health_pb2.HealthCheckResponse.NOT_SERVING
            )

        await _until(redis_not_serving)
        entry = await _redis_entry(channel)
        liveness = await _health(channel, "")
        readiness = await _health(channel, AUTH_SERVICE)

    assert before.status == after.status == pg.PAYMENT_STATUS_SUCCEEDED
    assert entry.kind == mesh_pb2.DEPENDENCY_KIND_CACHE
    assert entry.health == mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE
    assert entry.target == own_redis.url and entry.last_error
    assert liveness == readiness == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:6379", "http://127.0.0.1:6379"),
        ("redis://:hunter2@127.0.0.1:6379/x", "redis://:***@127.0.0.1:6379/x"),
        ("redis://127.0.0.1:notaport", "redis://127.0.0.1:notaport"),
    ],
)
def test_a_bad_redis_url_is_refused_naming_the_variable_and_never_its_password(
    url: str, shown: str
) -> None:
    with pytest.raises(SharedStateError) as caught:
        SharedState.from_environ({REDIS_URL_VAR: url})
    message = str(caught.value)
    assert message.startswith(f"{REDIS_URL_VAR}={shown!r}")
    assert "hunter2" not in message


def test_no_redis_url_means_no_shared_state() -> None:
    assert SharedState.from_environ({}) is None
    assert SharedState.from_environ({REDIS_URL_VAR: " "}) is None


async def test_the_launcher_engine_starts_redis_and_points_members_at_it() -> None:
    require_redis_server()
    engine: LocalEngine = RedisEngine()
    environ = engine.start()
    try:
        shared = SharedState.from_environ(environ)
        assert shared is not None
        assert await shared.ping() == ""
        await shared.close()
    finally:
        engine.stop()
    assert engine.name == "redis"
