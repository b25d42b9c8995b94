"""The grpc.aio chain against a real server that fails on command."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import status_pb2
from grpc import aio

from interceptors.aio import PolicyInterceptor, StreamDeadlineInterceptor
from interceptors.chain import ClientChain
from interceptors.errors import CallError, error_info, retry_delay_of
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from tests.integration.gated import GatedServicer
from tests.integration.harness import (
    TARGET,
    Fault,
    RunningServer,
    ScriptedServicer,
    ShiftedClock,
    eventually,
    make_chain,
    serving,
    start_server,
    stub_for,
)

UNAVAILABLE = Fault(code=grpc.StatusCode.UNAVAILABLE)
#: The server reads its remaining time off the wall clock; allow the two clocks to disagree a bit.
CLOCK_SKEW_S = 0.05
NO_BREAKER = {"breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000}}


def test_chain_is_one_unary_interceptor_over_the_loop_and_one_stream_interceptor() -> None:
    unary, stream = make_chain().aio_interceptors(TARGET)
    assert isinstance(unary, PolicyInterceptor)
    assert isinstance(stream, StreamDeadlineInterceptor)


async def test_unavailable_twice_then_ok_succeeds_on_third_attempt() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", UNAVAILABLE, UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            response = await stub.Read(pb.ReadRequest(text="hi"))
    assert response.attempt == 3


async def test_retries_send_previous_attempts_metadata() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", UNAVAILABLE, UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            await stub.Read(pb.ReadRequest())
    sent = [a.metadata.get("grpc-previous-rpc-attempts") for a in srv.servicer.attempts]
    assert sent == [None, "1", "2"]


async def test_non_idempotent_call_without_request_id_is_sent_once() -> None:
    async with serving() as srv:
        srv.servicer.fail("WriteUnsafe", UNAVAILABLE, UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            with pytest.raises(CallError) as caught:
                await stub.WriteUnsafe(pb.WriteUnsafeRequest(text="x"))
    assert srv.servicer.count() == 1
    assert (caught.value.attempts, caught.value.stop_reason) == (1, "not_retryable")


async def test_write_with_request_id_is_retried() -> None:
    async with serving() as srv:
        srv.servicer.fail("Write", UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            await stub.Write(pb.WriteRequest(request_id="r-1", text="x"))
    assert srv.servicer.count("Write") == 2


async def test_write_without_request_id_is_sent_once() -> None:
    async with serving() as srv:
        srv.servicer.fail("Write", UNAVAILABLE)
        async with stub_for(make_chain(), srv.address) as stub:
            with pytest.raises(CallError):
                await stub.Write(pb.WriteRequest(text="x"))
    assert srv.servicer.count("Write") == 1


async def test_invalid_argument_is_sent_once_and_leaves_breaker_closed() -> None:
    chain = make_chain()
    async with serving() as srv:
        srv.servicer.default = Fault(code=grpc.StatusCode.INVALID_ARGUMENT)
        async with stub_for(chain, srv.address) as stub:
            for _ in range(10):
                with pytest.raises(CallError) as caught:
                    await stub.Read(pb.ReadRequest())
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert srv.servicer.count() == 10
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_breaker_trip_stops_calls_reaching_the_server() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(chain, srv.address) as stub:
            for _ in range(20):
                with pytest.raises(CallError):
                    await stub.Read(pb.ReadRequest())
    assert srv.servicer.count() == 5
    assert chain.breakers.states() == {TARGET: "open"}


async def test_open_breaker_fails_fast_with_circuit_open_naming_target() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(chain, srv.address) as stub:
            for _ in range(5):
                with pytest.raises(CallError):
                    await stub.Read(pb.ReadRequest())
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    error = caught.value
    assert (error.code(), error.stop_reason, error.attempts) == (
        grpc.StatusCode.UNAVAILABLE,
        "breaker_open",
        0,
    )
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    info = error_info(status_pb2.Status.FromString(details))
    assert info is not None
    assert (info.reason, info.metadata["target"]) == ("CIRCUIT_OPEN", TARGET)


async def test_half_open_admits_exactly_three_trial_calls() -> None:
    clock = ShiftedClock()
    chain = make_chain({"retry": {"max_attempts": 1}}, clock=clock)
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(chain, srv.address) as stub:
            for _ in range(5):
                with pytest.raises(CallError):
                    await stub.Read(pb.ReadRequest())
            clock.advance(31)
            srv.servicer.default = Fault(hold_s=0.3)
            results = await asyncio.gather(
                *(stub.Read(pb.ReadRequest()) for _ in range(10)), return_exceptions=True
            )
    assert srv.servicer.count() == 5 + 3
    rejected = [r for r in results if isinstance(r, CallError)]
    assert len(rejected) == 7
    assert all(r.stop_reason == "breaker_open" for r in rejected)
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_fifty_concurrent_calls_are_not_serialized_by_the_breaker() -> None:
    servicer = ScriptedServicer(gather_until=50)
    async with serving(servicer) as srv, stub_for(make_chain(), srv.address) as stub:
        await asyncio.gather(*(stub.Read(pb.ReadRequest()) for _ in range(50)))
    assert servicer.peak_active == 50


async def test_deadline_is_overall_across_retries() -> None:
    chain = make_chain({"timeout_s": 0.6, "retry": {"max_attempts": 50}, **NO_BREAKER})
    async with serving() as srv:
        srv.servicer.default = Fault(code=grpc.StatusCode.UNAVAILABLE, hold_s=0.1)
        async with stub_for(chain, srv.address) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    remaining = [a.time_remaining for a in srv.servicer.attempts if a.time_remaining is not None]
    assert len(remaining) == len(srv.servicer.attempts)
    assert all(r <= 0.6 + CLOCK_SKEW_S for r in remaining)
    assert remaining == sorted(remaining, reverse=True)  # never reset per attempt
    assert caught.value.stop_reason == "deadline"
    assert caught.value.attempts == len(remaining) < 50


async def test_every_call_carries_a_deadline_from_policy() -> None:
    async with serving() as srv, stub_for(make_chain({"timeout_s": 2.0}), srv.address) as stub:
        await stub.Read(pb.ReadRequest())
    remaining = srv.servicer.attempts[0].time_remaining
    assert remaining is not None and 0 < remaining <= 2.0 + CLOCK_SKEW_S


async def test_caller_timeout_replaces_policy_timeout() -> None:
    async with serving() as srv, stub_for(make_chain({"timeout_s": 5.0}), srv.address) as stub:
        await stub.Read(pb.ReadRequest(), timeout=1.0)
    remaining = srv.servicer.attempts[0].time_remaining
    assert remaining is not None and remaining <= 1.0 + CLOCK_SKEW_S


async def test_retry_budget_bounds_attempts_during_an_outage() -> None:
    policy = {"budget": {"retry_ratio": 0.2, "min_retries": 3}, **NO_BREAKER}
    chain = make_chain(policy)
    calls = 50
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(chain, srv.address) as stub:
            for _ in range(calls):
                with pytest.raises(CallError):
                    await stub.Read(pb.ReadRequest())
    assert srv.servicer.count() <= 1.2 * calls + 3
    assert chain.telemetry.value("budget_exhausted_total", target=TARGET) > 0


async def test_pushback_delay_is_honoured() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=300))
        async with stub_for(make_chain(), srv.address) as stub:
            await stub.Read(pb.ReadRequest())
    first, second = srv.servicer.attempts
    assert second.at - first.at >= 0.3


async def test_negative_pushback_stops_retries() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.UNAVAILABLE, pushback_ms=-1))
        async with stub_for(make_chain(), srv.address) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    assert (srv.servicer.count(), caught.value.stop_reason) == (1, "pushback")


async def test_resource_exhausted_without_pushback_is_not_retried() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.RESOURCE_EXHAUSTED))
        async with stub_for(make_chain(), srv.address) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    assert (srv.servicer.count(), caught.value.stop_reason) == (1, "not_retryable")


async def test_retry_info_delay_is_honoured() -> None:
    async with serving() as srv:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.ABORTED, retry_delay_s=0.2))
        async with stub_for(make_chain(), srv.address) as stub:
            await stub.Read(pb.ReadRequest())
    first, second = srv.servicer.attempts
    assert second.at - first.at >= 0.2


async def test_attempts_exhausted_reports_every_attempt() -> None:
    async with serving() as srv:
        srv.servicer.default = UNAVAILABLE
        async with stub_for(make_chain(NO_BREAKER), srv.address) as stub:
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
    assert (caught.value.attempts, caught.value.stop_reason) == (4, "attempts_exhausted")
    assert caught.value.target == TARGET
    assert caught.value.method == "/paymesh.testing.v1.TestService/Read"


async def test_server_restart_is_survived_within_the_deadline() -> None:
    chain = make_chain({"timeout_s": 8.0, **NO_BREAKER})
    servicer = ScriptedServicer()
    srv = await start_server(servicer)
    port = srv.port
    async with stub_for(chain, srv.address) as stub:
        await stub.Read(pb.ReadRequest())
        await srv.server.stop(None)

        async def restart_later() -> None:
            await asyncio.sleep(0.5)  # the outage the call has to ride out
            restarted.append(await start_server(ScriptedServicer(), port))

        restarted: list[RunningServer] = []
        task = asyncio.create_task(restart_later())
        response = await stub.Read(pb.ReadRequest(text="back"))
        await task
    assert response.text == "back"
    for running in restarted:
        await running.server.stop(None)


#: More calls than the breaker's minimum of 5, as many as opened merchant-auth's in review.
CALLS = 12
#: The target holds every call far longer than any deadline in these tests.
HOLD_MS = 5_000


@contextlib.asynccontextmanager
async def relay_to_held_target(
    chain: ClientChain,
) -> AsyncIterator[tuple[testing_pb2_grpc.TestServiceAsyncStub, RunningServer]]:
    """Caller -> relay (its outgoing calls through ``chain``) -> a target that holds.

    The caller's channel has no chain: its deadline reaches the relay, whose server
    interceptor captures it and whose chain propagates it to the target.
    """
    async with serving() as target, stub_for(chain, target.address) as onward:
        relay = ScriptedServicer(name="relay", next_hop=onward)
        async with serving(relay) as hop, aio.insecure_channel(hop.address) as channel:
            yield testing_pb2_grpc.TestServiceStub(channel), target


async def test_short_propagated_deadlines_never_open_the_targets_breaker() -> None:
    chain = make_chain({"timeout_s": 5.0})
    async with relay_to_held_target(chain) as (caller, _):
        for _ in range(CALLS):
            with pytest.raises(aio.AioRpcError) as caught:
                await caller.Relay(pb.RelayRequest(hold_ms=HOLD_MS), timeout=0.2)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The caller's answer can come before the relay's chain has recorded its last call.
        await eventually(lambda: chain.telemetry.value("calls_total", target=TARGET) == CALLS)
    assert chain.telemetry.value("deadline_propagated_total", target=TARGET) == CALLS
    # Each call ends on its propagated deadline, or, when the loop runs late under load, on the
    # caller's cancel of the relay's handler that arrives first: neither is the target's fault.
    ended = {
        code: chain.telemetry.value("calls_total", target=TARGET, code=code)
        for code in ("DEADLINE_EXCEEDED", "CANCELLED")
    }
    assert sum(ended.values()) == CALLS, ended
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_timeouts_within_the_policys_own_timeout_open_the_targets_breaker() -> None:
    chain = make_chain({"timeout_s": 0.1})
    async with relay_to_held_target(chain) as (caller, _):
        for _ in range(CALLS):
            with pytest.raises(aio.AioRpcError):
                await caller.Relay(pb.RelayRequest(hold_ms=HOLD_MS), timeout=5.0)
    assert chain.telemetry.value("deadline_propagated_total", target=TARGET) == 0
    assert chain.telemetry.value("calls_total", target=TARGET, code="DEADLINE_EXCEEDED") >= 1
    assert chain.breakers.states() == {TARGET: "open"}


async def test_calls_the_caller_cancels_never_open_the_breaker() -> None:
    chain = make_chain()
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        srv.servicer.default = Fault(hold_s=HOLD_MS / 1000)

        async def read() -> pb.ReadResponse:
            response: pb.ReadResponse = await stub.Read(pb.ReadRequest())
            return response

        calls = [asyncio.create_task(read()) for _ in range(CALLS)]
        await eventually(lambda: srv.servicer.active == CALLS)
        for call in calls:
            call.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert chain.breakers.states() == {TARGET: "closed"}


async def test_cancelled_status_from_the_target_never_opens_the_breaker() -> None:
    chain = make_chain()
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        srv.servicer.default = Fault(code=grpc.StatusCode.CANCELLED)
        for _ in range(CALLS):
            with pytest.raises(CallError) as caught:
                await stub.Read(pb.ReadRequest())
            assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert srv.servicer.count() == CALLS
    assert chain.breakers.states() == {TARGET: "closed"}


# --- hang detection: consecutive failures, slow calls in flight, the limit in flight ---------


async def _read(stub: testing_pb2_grpc.TestServiceAsyncStub) -> pb.ReadResponse:
    response: pb.ReadResponse = await stub.Read(pb.ReadRequest())
    return response


def _reason_and_delay(error: CallError) -> tuple[str, float | None]:
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    info = error_info(status)
    assert info is not None
    return info.reason, retry_delay_of(status)


async def test_five_failures_in_a_row_open_it_though_the_window_holds_successes() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        for _ in range(20):
            await stub.Read(pb.ReadRequest())
        srv.servicer.default = UNAVAILABLE
        for _ in range(10):
            with pytest.raises(CallError):
                await stub.Read(pb.ReadRequest())
    assert srv.servicer.count() == 20 + 5  # 5 of 25 failed: far under the failure rate
    assert chain.breakers.states() == {TARGET: "open"}
    assert chain.telemetry.value("breaker_trips_total", rule="consecutive_failures") == 1


async def test_calls_beyond_the_targets_limit_in_flight_are_refused_at_once() -> None:
    chain = make_chain({"breaker": {"max_concurrent_calls": 2}})
    servicer = GatedServicer()
    async with serving(servicer) as srv, stub_for(chain, srv.address) as stub:
        held = [asyncio.create_task(_read(stub)) for _ in range(2)]
        await eventually(lambda: servicer.held == 2)
        with pytest.raises(CallError) as caught:
            await stub.Read(pb.ReadRequest())
        assert servicer.held == 2  # the refused call never reached the target
        servicer.gate.set()
        await asyncio.gather(*held)
        await stub.Read(pb.ReadRequest())  # a slot is free again
    error = caught.value
    assert (error.code(), error.stop_reason, error.attempts) == (
        grpc.StatusCode.UNAVAILABLE,
        "concurrency_limited",
        0,
    )
    assert _reason_and_delay(error) == ("CONCURRENCY_LIMITED", 2.5)
    assert servicer.count() == 3
    assert chain.telemetry.value("concurrency_limited_total", target=TARGET) == 1
    assert chain.breakers.states() == {TARGET: "closed"}  # a refusal is not a failure


async def test_a_hung_target_opens_the_breaker_and_fails_the_calls_in_flight() -> None:
    clock = ShiftedClock()
    chain = make_chain({"timeout_s": 30.0}, clock=clock)
    servicer = GatedServicer()  # never opened: the target answers nothing
    async with serving(servicer) as srv, stub_for(chain, srv.address) as stub:
        hung = [asyncio.create_task(_read(stub)) for _ in range(3)]
        await eventually(lambda: servicer.held == 3)
        clock.advance(2.5)  # the three have run the slow-call duration, on the breaker's clock
        with pytest.raises(CallError) as refused:
            await stub.Read(pb.ReadRequest())
        results = await asyncio.gather(*hung, return_exceptions=True)
        await eventually(lambda: servicer.held == 0)  # the target saw them cancelled
    assert refused.value.stop_reason == "breaker_open"
    assert refused.value.attempts == 0
    assert all(isinstance(r, CallError) for r in results)
    failed = [r for r in results if isinstance(r, CallError)]
    assert {(r.code(), r.stop_reason, r.attempts) for r in failed} == {
        (grpc.StatusCode.UNAVAILABLE, "breaker_open", 1)
    }
    assert {_reason_and_delay(r)[0] for r in failed} == {"CIRCUIT_OPEN"}
    assert chain.breakers.states() == {TARGET: "open"}
    assert chain.telemetry.value("breaker_trips_total", rule="slow_call_rate") == 1
    assert chain.telemetry.value("breaker_aborted_total", target=TARGET) == 3


async def test_a_slow_call_within_the_slow_duration_keeps_the_breaker_closed() -> None:
    chain = make_chain({"breaker": {"slow_call_duration_s": 1.0}})
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        srv.servicer.default = Fault(hold_s=0.3)  # slow, but under the threshold
        await asyncio.gather(*(stub.Read(pb.ReadRequest()) for _ in range(10)))
    assert chain.breakers.states() == {TARGET: "closed"}
    assert chain.breakers.readouts()[TARGET].slow_calls == 0


async def test_a_call_its_caller_cancels_stays_cancelled_and_frees_its_slot() -> None:
    chain = make_chain({"timeout_s": 30.0})
    servicer = GatedServicer()
    async with serving(servicer) as srv, stub_for(chain, srv.address) as stub:
        held = asyncio.create_task(_read(stub))
        await eventually(lambda: servicer.held == 1)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    assert chain.telemetry.value("breaker_aborted_total", target=TARGET) == 0
    assert chain.breakers.readouts()[TARGET].in_flight == 0
