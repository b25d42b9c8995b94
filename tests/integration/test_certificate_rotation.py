"""Certificates rotate without a restart: servers present new files from the next handshake,
client channels are rebuilt when their own identity changes, stubs made earlier follow."""

from __future__ import annotations

import asyncio
import datetime
import shutil
from pathlib import Path

import grpc
import pytest
from grpc import aio

from interceptors.chain import build_client_chain
from interceptors.policy import PolicyConfig
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh import pki
from services.mesh.clients import ClientFactory, RotatingChannel
from services.mesh.tls import PKI_DIR_VAR, TransportSecurity
from services.mesh.topology import Target, Topology
from services.order.__main__ import build
from tests.servers import running_service, test_pki_dir


def _copy_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    shutil.copytree(test_pki_dir(), directory)
    return directory


async def _get_order(channel: aio.Channel) -> grpc.StatusCode:
    try:
        await order_pb2_grpc.OrderServiceStub(channel).GetOrder(
            order_pb2.GetOrderRequest(order_id="o_missing"), timeout=5
        )
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_server_presents_its_rotated_certificate_without_a_restart(
    tmp_path: Path,
) -> None:
    served = _copy_pki(tmp_path)
    other = tmp_path / "other-ca"
    pki.ensure_dev_pki(other, ["order-service", pki.OPERATOR])
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), PKI_DIR_VAR: str(served)}
    old_operator = TransportSecurity.from_environ(pki.OPERATOR, {PKI_DIR_VAR: str(served)})
    new_operator = TransportSecurity.from_environ(pki.OPERATOR, {PKI_DIR_VAR: str(other)})
    async with running_service("order-service", build, environ=environ) as address:
        async with old_operator.aio_channel("order-service", address) as channel:
            assert await _get_order(channel) == grpc.StatusCode.NOT_FOUND
        # Rotate the running server onto another CA: key first, then certificate, then CA.
        for name in ("order-service-key.pem", "order-service.pem", "ca.pem"):
            staged = served / f".{name}.new"
            shutil.copyfile(other / name, staged)
            staged.replace(served / name)
        async with new_operator.aio_channel("order-service", address) as channel:
            assert await _get_order(channel) == grpc.StatusCode.NOT_FOUND
        async with old_operator.aio_channel("order-service", address) as channel:
            assert await _get_order(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_channels_are_rebuilt_when_the_callers_certificate_rotates(
    tmp_path: Path,
) -> None:
    caller_pki = _copy_pki(tmp_path)
    async with running_service(
        "order-service", build, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
    ) as address:
        security = TransportSecurity.from_environ("payment-gateway", {PKI_DIR_VAR: str(caller_pki)})
        topology = Topology(environ={"ORDER_SERVICE_ADDR": address})
        chain = build_client_chain(caller="payment-gateway", config=PolicyConfig())
        clients = ClientFactory(
            caller="payment-gateway", topology=topology, chain=chain, security=security
        )
        stub = clients.stub(Target.ORDER, order_pb2_grpc.OrderServiceStub)
        channel = clients.channel(Target.ORDER)
        assert isinstance(channel, RotatingChannel)
        request = order_pb2.GetOrderRequest(order_id="o_missing")
        with pytest.raises(aio.AioRpcError) as before:
            await stub.GetOrder(request)
        assert before.value.code() == grpc.StatusCode.NOT_FOUND
        assert clients.rotate_if_changed() is False  # nothing changed yet

        (caller_pki / "payment-gateway.pem").unlink()  # a new leaf, as a renewal issues it
        renewed = pki.ensure_dev_pki(caller_pki, ["payment-gateway"])
        assert renewed == ["payment-gateway"]
        assert clients.rotate_if_changed() is True
        assert channel.generation == 1
        with pytest.raises(aio.AioRpcError) as after:  # the stub made before follows
            await stub.GetOrder(request)
        assert after.value.code() == grpc.StatusCode.NOT_FOUND
        await asyncio.sleep(0)
        await clients.close()


def test_a_leaf_is_renewed_once_a_third_of_its_lifetime_is_left(tmp_path: Path) -> None:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert pki.ensure_dev_pki(tmp_path, ["risk-service"], clock=lambda: start) == ["risk-service"]
    day_15 = start + datetime.timedelta(days=15)
    assert pki.ensure_dev_pki(tmp_path, ["risk-service"], clock=lambda: day_15) == []
    day_21 = start + datetime.timedelta(days=21)
    assert pki.ensure_dev_pki(tmp_path, ["risk-service"], clock=lambda: day_21) == ["risk-service"]
    leaf = (tmp_path / "risk-service.pem").read_bytes()
    assert pki.spiffe_ids_of(leaf) == ["spiffe://paymesh.local/ns/paymesh/sa/risk-service"]
