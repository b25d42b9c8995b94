"""The client factory's unary attempts on the channel's core call (aio.CoreAttempts) and the
public-stub fallback (aio.StubAttempts) for a multicallable it cannot take apart: both against
a real server, with the same answers, failures, trailing metadata and cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from interceptors.aio import (
    PolicyMultiCallable,
    UnaryPolicy,
    core_method,
)
from interceptors.errors import PUSHBACK_KEY, CallError
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from tests.integration.gated import GatedServicer
from tests.integration.harness import TARGET, Fault, eventually, make_chain, serving

READ = "/paymesh.testing.v1.TestService/Read"


class _Passing(aio.UnaryUnaryClientInterceptor):
    """An interceptor of the caller's own: its channel's multicallables are not plain."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def _policy_callable(channel: aio.Channel, chain: Any) -> PolicyMultiCallable:
    plain = channel.unary_unary(
        READ,
        request_serializer=pb.ReadRequest.SerializeToString,
        response_deserializer=pb.ReadResponse.FromString,
    )
    return PolicyMultiCallable(UnaryPolicy(chain.runtime, TARGET), READ, plain)


def test_only_grpcs_own_plain_multicallable_is_taken_apart() -> None:
    async def check() -> tuple[bool, bool, bool]:
        plain = aio.insecure_channel("127.0.0.1:1")
        intercepted = aio.insecure_channel("127.0.0.1:1", interceptors=[_Passing()])
        try:
            return (
                core_method(plain.unary_unary(READ)) is not None,
                core_method(intercepted.unary_unary(READ)) is None,
                core_method(object()) is None,
            )
        finally:
            await plain.close()
            await intercepted.close()

    assert asyncio.run(check()) == (True, True, True)


@pytest.mark.parametrize("interceptors", [(), (_Passing(),)], ids=["core", "public"])
async def test_both_paths_answer_retry_and_word_failures_alike(interceptors: Any) -> None:
    chain = make_chain({"retry": {"max_attempts": 2}})
    async with serving() as srv:
        channel = aio.insecure_channel(srv.address, interceptors=list(interceptors))
        try:
            call = _policy_callable(channel, chain)
            assert (core_method(call._plain) is None) == bool(interceptors)
            srv.servicer.fail("Read", Fault(code=grpc.StatusCode.UNAVAILABLE))
            answer = await call(pb.ReadRequest(text="hi"), metadata=(("x-mine", "1"),))
            srv.servicer.fail(
                "Read", *[Fault(code=grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=-1)] * 2
            )
            with pytest.raises(CallError) as failed:
                await call(pb.ReadRequest(text="again"))
        finally:
            await channel.close()
    assert (answer.text, answer.attempt) == ("hi", 2)
    assert [a.metadata.get("x-mine") for a in srv.servicer.attempts[:2]] == ["1", "1"]
    error = failed.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "scripted RESOURCE_EXHAUSTED"
    assert error.attempts == 1  # a pushback of -1 says: do not retry
    assert dict(error.trailing_metadata() or ())[PUSHBACK_KEY] == "-1"


async def test_a_cancelled_core_call_is_cancelled_at_the_server_too() -> None:
    chain = make_chain({"timeout_s": 30.0})
    servicer = GatedServicer()
    async with serving(servicer) as srv:
        channel = chain.aio_channel(TARGET, srv.address)
        try:
            stub = testing_pb2_grpc.TestServiceStub(channel)

            async def read() -> pb.ReadResponse:
                response: pb.ReadResponse = await stub.Read(pb.ReadRequest())
                return response

            held = asyncio.create_task(read())
            await eventually(lambda: servicer.held == 1)
            held.cancel()
            with pytest.raises(asyncio.CancelledError):
                await held
            await eventually(lambda: servicer.held == 0)  # the server saw it go
        finally:
            await channel.close()
    assert chain.breakers.readouts()[TARGET].in_flight == 0
    assert chain.telemetry.value("calls_total", target=TARGET, code="CANCELLED") == 1


async def test_a_deadline_on_the_core_path_ends_the_call_with_deadline_exceeded() -> None:
    chain = make_chain({"timeout_s": 0.2, "retry": {"max_attempts": 1}})
    async with serving() as srv:
        srv.servicer.default = Fault(hold_s=2.0)
        channel = chain.aio_channel(TARGET, srv.address)
        try:
            stub = testing_pb2_grpc.TestServiceStub(channel)
            with pytest.raises(CallError) as failed:
                await stub.Read(pb.ReadRequest())
        finally:
            await channel.close()
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
