"""Three hops A -> B -> C through the chain: deadline propagation, cancellation, one retry layer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from interceptors.errors import CallError
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from tests.integration.harness import (
    Fault,
    ScriptedServicer,
    make_chain,
    serving,
    stub_for,
)

CLOCK_SKEW_S = 0.05
NO_BREAKER = {"breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000}}


@dataclass
class Mesh:
    """Servicers of the three hops and a client stub of A."""

    a: ScriptedServicer
    b: ScriptedServicer
    c: ScriptedServicer
    client: testing_pb2_grpc.TestServiceAsyncStub


@contextlib.asynccontextmanager
async def mesh(policy: dict[str, Any] | None = None) -> AsyncIterator[Mesh]:
    """C serves; B relays to C and A to B, each through its own chain with ``policy``."""
    a, b, c = ScriptedServicer(name="a"), ScriptedServicer(name="b"), ScriptedServicer(name="c")
    async with contextlib.AsyncExitStack() as stack:
        srv_c = await stack.enter_async_context(serving(c))
        b.next_hop = await stack.enter_async_context(
            stub_for(make_chain(policy, caller="b"), srv_c.address, target="c")
        )
        srv_b = await stack.enter_async_context(serving(b))
        a.next_hop = await stack.enter_async_context(
            stub_for(make_chain(policy, caller="a"), srv_b.address, target="b")
        )
        srv_a = await stack.enter_async_context(serving(a))
        client = await stack.enter_async_context(
            stub_for(make_chain(policy, caller="client"), srv_a.address, target="a")
        )
        yield Mesh(a=a, b=b, c=c, client=client)


async def test_last_hop_sees_at_most_the_first_callers_budget() -> None:
    async with mesh() as m:
        response = await m.client.Relay(pb.RelayRequest(text="x"), timeout=2.0)
    seen_by_b = m.b.attempts[0].time_remaining
    assert seen_by_b is not None
    assert 0 < response.deadline_left_s <= seen_by_b + CLOCK_SKEW_S <= 2.0 + 2 * CLOCK_SKEW_S


async def test_incoming_deadline_overrides_a_longer_policy_timeout() -> None:
    async with mesh({"timeout_s": 30.0}) as m:
        response = await m.client.Relay(pb.RelayRequest(), timeout=1.0)
    assert response.deadline_left_s <= 1.0 + CLOCK_SKEW_S


async def test_nothing_left_of_the_deadline_fails_fast_without_sending() -> None:
    async with mesh({"deadline_margin_s": 0.8}) as m:
        with pytest.raises(CallError) as caught:
            await m.client.Relay(pb.RelayRequest(), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert m.b.count() == 0


async def test_cancelling_the_first_call_cancels_the_last_hop() -> None:
    async with mesh() as m:

        async def relay() -> pb.RelayResponse:
            return await m.client.Relay(pb.RelayRequest(hold_ms=20_000), timeout=30)

        call = asyncio.create_task(relay())
        await asyncio.wait_for(m.c.arrived.wait(), timeout=5)
        call.cancel()
        await asyncio.wait_for(m.c.cancelled.wait(), timeout=5)
    assert m.c.cancelled.is_set()
    assert m.b.cancelled.is_set()


async def test_deadline_hit_upstream_cancels_the_last_hop() -> None:
    async with mesh() as m:
        with pytest.raises(CallError):
            await m.client.Relay(pb.RelayRequest(hold_ms=20_000), timeout=0.5)
        await asyncio.wait_for(m.c.cancelled.wait(), timeout=5)


async def test_only_the_bottom_layer_retries_when_the_last_hop_is_down() -> None:
    calls = 20
    async with mesh({"budget": {"min_retries": 3}, **NO_BREAKER}) as m:
        m.c.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
        for _ in range(calls):
            with pytest.raises(CallError) as caught:
                await m.client.Relay(pb.RelayRequest())
            assert caught.value.stop_reason == "pushback"
    assert m.a.count() == calls  # the client did not retry A
    assert m.b.count() == calls  # A did not retry B
    assert m.c.count() <= 1.2 * calls + 3


async def test_open_breaker_downstream_reaches_the_caller_as_circuit_open() -> None:
    async with mesh({"retry": {"max_attempts": 1}}) as m:
        m.c.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
        for _ in range(6):
            with pytest.raises(CallError) as caught:
                await m.client.Relay(pb.RelayRequest())
    assert m.c.count() == 5
    assert "CIRCUIT_OPEN" in str(caught.value.trailing_metadata())
