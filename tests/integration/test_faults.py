"""Server-side fault injection switched at run time through the admin endpoint."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.launcher import free_port
from services.order.__main__ import build
from tests.servers import running_service

GET_ORDER = "/paymesh.order.v1.OrderService/GetOrder"
Service = tuple[order_pb2_grpc.OrderServiceStub, str]


def _admin(admin: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{admin}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _call(admin: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    return await asyncio.to_thread(_admin, admin, method, path, body)


@pytest.fixture
async def order_service(tmp_path: Path) -> AsyncIterator[Service]:
    admin = f"127.0.0.1:{free_port()}"
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "ORDER_SERVICE_ADMIN_ADDR": admin}
    async with running_service("order-service", build, environ=environ) as address:
        async with aio.insecure_channel(address) as channel:
            yield order_pb2_grpc.OrderServiceStub(channel), admin


async def test_abort_fault_fails_the_method_with_its_code(order_service: Service) -> None:
    stub, admin = order_service
    status, _ = await _call(
        admin, "PUT", "/faults", [{"method": GET_ORDER, "abort_code": "unavailable"}]
    )
    assert status == 200
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Other methods are untouched.
    await stub.ListOrders(order_pb2.ListOrdersRequest())


async def test_delay_fault_delays_and_clearing_restores(order_service: Service) -> None:
    stub, admin = order_service
    await _call(
        admin, "PUT", "/faults", [{"method": "/paymesh.order.v1.OrderService/*", "delay_ms": 300}]
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.ListOrders(order_pb2.ListOrdersRequest(), timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status, body = await _call(admin, "DELETE", "/faults")
    assert (status, body) == (200, {"faults": []})
    started = time.monotonic()
    await stub.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
    assert time.monotonic() - started < 5


async def test_bad_fault_is_a_400_naming_the_problem(order_service: Service) -> None:
    _, admin = order_service
    status, body = await _call(admin, "PUT", "/faults", [{"method": GET_ORDER, "rate": 2}])
    assert status == 400
    assert "rate" in str(body)
    status, body = await _call(admin, "PUT", "/faults", [{"methd": GET_ORDER}])
    assert status == 400
    assert "methd" in str(body)
