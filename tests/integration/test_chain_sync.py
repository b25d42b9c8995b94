"""The sync adapter (grpc-interceptor based) against the same failing server.

The server runs on the test's event loop, so each blocking sync call runs in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest
from google.rpc import status_pb2

from interceptors.chain import ClientChain
from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import CallError, error_info, retry_delay_of
from interceptors.sync import SyncPolicyInterceptor
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from tests.integration.gated import GatedServicer
from tests.integration.harness import (
    TARGET,
    Fault,
    ScriptedServicer,
    eventually,
    make_chain,
    serving,
)

UNAVAILABLE = Fault(code=grpc.StatusCode.UNAVAILABLE)
T = TypeVar("T")


async def in_thread(
    chain: ClientChain, address: str, use: Callable[[testing_pb2_grpc.TestServiceStub], T]
) -> T:
    def run() -> T:
        with grpc.insecure_channel(address, options=chain.channel_options()) as channel:
            intercepted = grpc.intercept_channel(channel, *chain.sync_interceptors(TARGET))
            return use(testing_pb2_grpc.TestServiceStub(intercepted))

    return await asyncio.to_thread(run)


def test_sync_chain_is_one_grpc_interceptor_client_interceptor_over_the_loop() -> None:
    layers = [type(i) for i in make_chain().sync_interceptors(TARGET)]
    assert layers == [SyncPolicyInterceptor]


async def test_sync_unavailable_twice_then_ok_succeeds_on_third_attempt() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", UNAVAILABLE, UNAVAILABLE)
        response = await in_thread(make_chain(), srv.address, lambda s: s.Read(pb.ReadRequest()))
    assert response.attempt == 3
    sent = [a.metadata.get("grpc-previous-rpc-attempts") for a in srv.servicer.attempts]
    assert sent == [None, "1", "2"]


async def test_sync_non_idempotent_call_is_sent_once() -> None:
    async with serving() as srv:
        srv.servicer.fail("WriteUnsafe", UNAVAILABLE)
        with pytest.raises(CallError) as caught:
            await in_thread(
                make_chain(), srv.address, lambda s: s.WriteUnsafe(pb.WriteUnsafeRequest())
            )
    assert (srv.servicer.count(), caught.value.stop_reason) == (1, "not_retryable")


async def test_sync_invalid_argument_is_sent_once_and_leaves_breaker_closed() -> None:
    chain = make_chain()
    async with serving() as srv:
        srv.servicer.default = Fault(code=grpc.StatusCode.INVALID_ARGUMENT)
        for _ in range(6):
            with pytest.raises(CallError):
                await in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest()))
    assert srv.servicer.count() == 6
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_sync_open_breaker_fails_fast_without_reaching_target() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        for _ in range(5):
            with pytest.raises(CallError):
                await in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest()))
        with pytest.raises(CallError) as caught:
            await in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest()))
    assert srv.servicer.count() == 5
    assert (caught.value.code(), caught.value.stop_reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "breaker_open",
    )


async def test_sync_deadline_is_overall_across_retries() -> None:
    chain = make_chain({"timeout_s": 0.5, "retry": {"max_attempts": 50}})
    async with serving() as srv:
        srv.servicer.default = Fault(code=grpc.StatusCode.UNAVAILABLE, hold_s=0.1)
        with pytest.raises(CallError) as caught:
            await in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest()))
    remaining = [a.time_remaining for a in srv.servicer.attempts]
    assert remaining == sorted(remaining, reverse=True)  # type: ignore[type-var]
    assert caught.value.stop_reason in {"deadline", "breaker_open"}
    assert caught.value.attempts < 50


async def test_sync_pushback_is_honoured() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=200))
        await in_thread(make_chain(), srv.address, lambda s: s.Read(pb.ReadRequest()))
    first, second = srv.servicer.attempts
    assert second.at - first.at >= 0.2


async def test_sync_retry_budget_bounds_attempts_during_an_outage() -> None:
    chain = make_chain(
        {
            "budget": {"min_retries": 2},
            "breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000},
        }
    )
    calls = 20

    def outage(stub: testing_pb2_grpc.TestServiceStub) -> None:
        for _ in range(calls):
            with pytest.raises(CallError):
                stub.Read(pb.ReadRequest())

    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        await in_thread(chain, srv.address, outage)
    assert srv.servicer.count() <= 1.2 * calls + 2


async def test_sync_concurrent_calls_are_not_serialized() -> None:
    servicer = ScriptedServicer(gather_until=4)
    chain = make_chain()
    async with serving(servicer) as srv:
        await asyncio.gather(
            *(in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest())) for _ in range(4))
        )
    assert servicer.peak_active == 4


CALLS = 12
HELD = Fault(hold_s=5.0)


def called_with_incoming_deadline(
    seconds: float | None, calls: int
) -> Callable[[testing_pb2_grpc.TestServiceStub], list[grpc.StatusCode]]:
    """Make ``calls`` Reads as a handler would whose own caller gave it ``seconds``."""

    def use(stub: testing_pb2_grpc.TestServiceStub) -> list[grpc.StatusCode]:
        codes = []
        for _ in range(calls):
            token = set_incoming_deadline(seconds)  # what the server interceptor does
            try:
                stub.Read(pb.ReadRequest())
            except CallError as err:
                codes.append(err.code())
            finally:
                reset_incoming_deadline(token)
        return codes

    return use


async def test_sync_short_propagated_deadlines_never_open_the_breaker() -> None:
    chain = make_chain({"timeout_s": 5.0})
    async with serving() as srv:
        srv.servicer.default = HELD
        codes = await in_thread(chain, srv.address, called_with_incoming_deadline(0.2, CALLS))
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * CALLS
    assert chain.telemetry.value("deadline_propagated_total", target=TARGET) == CALLS
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_sync_timeouts_within_the_policys_own_timeout_open_the_breaker() -> None:
    chain = make_chain({"timeout_s": 0.1})
    async with serving() as srv:
        srv.servicer.default = HELD
        codes = await in_thread(chain, srv.address, called_with_incoming_deadline(5.0, CALLS))
    assert codes[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert chain.breakers.states() == {TARGET: "open"}


async def test_sync_cancelled_status_never_opens_the_breaker() -> None:
    chain = make_chain()
    async with serving() as srv:
        srv.servicer.default = Fault(code=grpc.StatusCode.CANCELLED)
        codes = await in_thread(chain, srv.address, called_with_incoming_deadline(None, CALLS))
    assert codes == [grpc.StatusCode.CANCELLED] * CALLS
    assert chain.breakers.states() == {TARGET: "closed"}


# --- hang detection: consecutive failures, the limit in flight -------------------------------


async def test_sync_five_failures_in_a_row_open_it_though_the_window_holds_successes() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})

    def calls(stub: testing_pb2_grpc.TestServiceStub) -> None:
        for _ in range(10):
            with pytest.raises(CallError):
                stub.Read(pb.ReadRequest())

    async with serving() as srv:
        await in_thread(chain, srv.address, lambda s: [s.Read(pb.ReadRequest()) for _ in range(20)])
        srv.servicer.default = UNAVAILABLE
        await in_thread(chain, srv.address, calls)
    assert srv.servicer.count() == 20 + 5
    assert chain.breakers.states() == {TARGET: "open"}
    assert chain.telemetry.value("breaker_trips_total", rule="consecutive_failures") == 1


async def test_sync_calls_beyond_the_targets_limit_in_flight_are_refused_at_once() -> None:
    chain = make_chain({"breaker": {"max_concurrent_calls": 2}})
    servicer = GatedServicer()
    async with serving(servicer) as srv:
        held = [
            asyncio.ensure_future(in_thread(chain, srv.address, lambda s: s.Read(pb.ReadRequest())))
            for _ in range(2)
        ]
        await eventually(lambda: servicer.held == 2)

        def refused(stub: testing_pb2_grpc.TestServiceStub) -> CallError:
            with pytest.raises(CallError) as caught:
                stub.Read(pb.ReadRequest())
            return caught.value

        error = await in_thread(chain, srv.address, refused)
        assert servicer.held == 2  # the refused call never reached the target
        servicer.gate.set()
        await asyncio.gather(*held)
    assert (error.code(), error.stop_reason, error.attempts) == (
        grpc.StatusCode.UNAVAILABLE,
        "concurrency_limited",
        0,
    )
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    info = error_info(status)
    assert info is not None
    assert (info.reason, retry_delay_of(status)) == ("CONCURRENCY_LIMITED", 2.5)
    assert chain.telemetry.value("concurrency_limited_total", target=TARGET) == 1
    assert chain.breakers.states() == {TARGET: "closed"}
