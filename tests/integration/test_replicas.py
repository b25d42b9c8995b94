"""Replicas behind one address: round robin, health, outlier ejection and the target's breaker.

Three test servers on 127.0.0.1 are one target (``ipv4:a,b,c``) of a chain-made channel, with
the balancing policy's service config; one of them fails every call, says NOT_SERVING or is
stopped, and the calls are expected to land on its peers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from interceptors.chain import ClientChain
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc
from tests.integration.harness import (
    TARGET,
    TEST_SERVICE,
    Fault,
    RunningServer,
    ScriptedServicer,
    eventually,
    make_chain,
    start_server,
)

#: A short sweep so an ejection is seen within a test; the rest is the shipped policy, except
#: a retry budget that lets every retry of the calls made before the first sweep through (the
#: test sends them back to back; the budget's bound is tested in test_chain_aio).
FAST_SWEEP = {"balancing": {"outlier_interval_s": 0.2}, "budget": {"min_retries": 1000}}


@contextlib.asynccontextmanager
async def replicas(
    chain: ClientChain, count: int = 3
) -> AsyncIterator[tuple[list[RunningServer], testing_pb2_grpc.TestServiceAsyncStub]]:
    """``count`` health-checked test servers behind one channel of ``chain``."""
    servers = [
        await start_server(ScriptedServicer(name=f"replica-{k}"), health=True) for k in range(count)
    ]
    target = "ipv4:" + ",".join(s.address for s in servers)
    channel = chain.aio_channel(TARGET, target, health_service=TEST_SERVICE)
    try:
        yield servers, testing_pb2_grpc.TestServiceStub(channel)
    finally:
        await channel.close()
        for server in servers:
            await server.server.stop(None)


async def read(stub: testing_pb2_grpc.TestServiceAsyncStub, times: int) -> None:
    for k in range(times):
        await stub.Read(testing_pb2.ReadRequest(text=f"r{k}"))


async def every_replica_ready(
    servers: list[RunningServer], stub: testing_pb2_grpc.TestServiceAsyncStub
) -> None:
    """Read until every replica has answered: round robin then spreads calls over all three.

    Until then the channel picks among the subchannels READY so far, so on a loaded machine the
    first calls can all meet one replica; a failure test starting there would test start-up.
    """
    for _ in range(200):
        if all(s.servicer.count() for s in servers):
            return
        await read(stub, 1)
    raise AssertionError(f"replicas never all served: {[s.servicer.count() for s in servers]}")


async def test_calls_go_round_robin_over_every_replica() -> None:
    async with replicas(make_chain(FAST_SWEEP)) as (servers, stub):
        await read(stub, 60)
        # Round robin from the first READY replica on: every one within two of its share.
        assert all(18 <= s.servicer.count("Read") <= 22 for s in servers)


async def test_failing_replica_is_ejected_while_peers_serve_and_breaker_stays_closed() -> None:
    chain = make_chain(FAST_SWEEP)
    async with replicas(chain) as (servers, stub):
        await every_replica_ready(servers, stub)
        failing = servers[1].servicer
        failing.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
        healthy_calls = failing.count()
        ejected_at: list[int] = []

        async def ejected() -> bool:
            before = failing.count()
            await read(stub, 12)  # every call succeeds: a retry lands on a peer
            ejected_at.append(before)
            return failing.count() == before

        for _ in range(100):
            if await ejected():
                break
        else:
            raise AssertionError(f"replica never ejected; it saw {failing.count()} calls")
        assert failing.count() - healthy_calls >= 5  # judged on the request volume of one sweep
        assert chain.breakers.states() == {TARGET: "closed"}
        await read(stub, 12)
        assert failing.count() == ejected_at[-1]


async def test_every_replica_failing_opens_the_targets_breaker() -> None:
    chain = make_chain(FAST_SWEEP)
    async with replicas(chain) as (servers, stub):
        for server in servers:
            server.servicer.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
        for _ in range(10):
            with contextlib.suppress(grpc.RpcError):
                await stub.Read(testing_pb2.ReadRequest(text="x"))
            if chain.breakers.states()[TARGET] == "open":
                break
        assert chain.breakers.states() == {TARGET: "open"}


async def test_replica_saying_not_serving_gets_no_calls() -> None:
    async with replicas(make_chain(FAST_SWEEP)) as (servers, stub):
        await read(stub, 3)
        await servers[2].health.set(TEST_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        resting = servers[2].servicer

        async def rested() -> bool:
            before = resting.count()
            await read(stub, 6)
            return resting.count() == before

        for _ in range(100):
            if await rested():
                break
        before = resting.count()
        await read(stub, 30)
        assert resting.count() == before
        assert servers[0].servicer.count() + servers[1].servicer.count() >= 30


async def test_stopped_replica_leaves_its_calls_to_the_peers() -> None:
    chain = make_chain(FAST_SWEEP)
    async with replicas(chain) as (servers, stub):
        await read(stub, 3)
        await servers[0].server.stop(None)
        peers = servers[1].servicer, servers[2].servicer
        before = sum(p.count() for p in peers)
        await read(stub, 30)  # the first may meet the closed connection; retried on a peer
        assert sum(p.count() for p in peers) - before >= 30
        await eventually(lambda: chain.breakers.states() == {TARGET: "closed"})
