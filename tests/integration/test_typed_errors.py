"""A servicer's domain error reaches a caller through the chain as the typed error of its code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from interceptors.errors import CallError, NotFoundError, Reason, UnavailableError
from paymesh.testing.v1 import testing_pb2 as pb
from paymesh.testing.v1 import testing_pb2_grpc
from services.mesh.errors import NotFound
from tests.integration.harness import (
    TARGET,
    Fault,
    RunningServer,
    ScriptedServicer,
    make_chain,
    serving,
    start_server,
    stub_for,
)


class MissingPayments(ScriptedServicer):
    """Knows no payment: every Read raises the domain error NotFound."""

    async def Read(self, request: Any, context: Any) -> pb.ReadResponse:
        await self._serve("Read", context)
        raise NotFound(
            f"payment {request.text!r} does not exist",
            reason=Reason.PAYMENT_NOT_FOUND,
            metadata={"payment_id": request.text},
        )


async def test_servicer_not_found_is_caught_as_not_found_error_with_its_reason() -> None:
    async with serving(MissingPayments(name="payment-gateway")) as srv:
        async with stub_for(make_chain(), srv.address) as stub:
            with pytest.raises(NotFoundError) as caught:
                await stub.Read(pb.ReadRequest(text="p_1"))
    error = caught.value
    assert error.reason == Reason.PAYMENT_NOT_FOUND
    assert (error.domain, error.metadata) == ("payment-gateway", {"payment_id": "p_1"})
    assert (error.code(), error.target, error.attempts) == (grpc.StatusCode.NOT_FOUND, TARGET, 1)
    assert srv.servicer.count("Read") == 1  # a definite answer is not retried


async def test_sync_chain_raises_the_same_typed_error() -> None:
    chain = make_chain()
    async with serving(MissingPayments(name="payment-gateway")) as srv:

        def read() -> None:
            with grpc.insecure_channel(srv.address, options=chain.channel_options()) as channel:
                intercepted = grpc.intercept_channel(channel, *chain.sync_interceptors(TARGET))
                testing_pb2_grpc.TestServiceStub(intercepted).Read(pb.ReadRequest(text="p_2"))

        with pytest.raises(NotFoundError) as caught:
            await asyncio.to_thread(read)
    assert (caught.value.reason, caught.value.metadata) == (
        Reason.PAYMENT_NOT_FOUND,
        {"payment_id": "p_2"},
    )


@contextlib.asynccontextmanager
async def _relay_to(bottom: RunningServer, name: str) -> AsyncIterator[RunningServer]:
    """A server whose Relay calls ``bottom`` through the chain and lets its errors escape."""
    chain = make_chain({"retry": {"max_attempts": 1}}, caller=name)
    async with stub_for(chain, bottom.address) as downstream:
        middle = await start_server(ScriptedServicer(name=name, next_hop=downstream))
        try:
            yield middle
        finally:
            await middle.server.stop(None)


class MissingRelay(ScriptedServicer):
    async def Relay(self, request: Any, context: Any) -> pb.RelayResponse:
        raise NotFound("no such relay", reason=Reason.NOT_FOUND, metadata={"text": request.text})


async def test_a_definite_error_escaping_a_servicer_keeps_its_class_and_reason() -> None:
    async with serving(MissingRelay(name="bottom-service")) as bottom:
        async with _relay_to(bottom, "middle-service") as middle:
            async with stub_for(make_chain(), middle.address) as stub:
                with pytest.raises(NotFoundError) as caught:
                    await stub.Relay(pb.RelayRequest(text="r"))
    # The middle service answers for itself (its domain), with the bottom's reason.
    assert (caught.value.reason, caught.value.domain) == (Reason.NOT_FOUND, "middle-service")


async def test_a_dependency_failure_escaping_a_servicer_is_unavailable_downstream() -> None:
    failing = ScriptedServicer(name="bottom-service", default=Fault(code=grpc.StatusCode.INTERNAL))
    async with serving(failing) as bottom:
        async with _relay_to(bottom, "middle-service") as middle:
            async with stub_for(make_chain({"retry": {"max_attempts": 1}}), middle.address) as stub:
                with pytest.raises(CallError) as caught:
                    await stub.Relay(pb.RelayRequest(text="r"))
    assert isinstance(caught.value, UnavailableError)
    assert caught.value.reason == Reason.DOWNSTREAM_UNAVAILABLE
    assert caught.value.metadata["target"] == TARGET
