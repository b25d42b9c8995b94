"""Server-side fault injection switched at run time through the admin endpoint.

``/faults`` is a control route: refused unless the service runs with
``PAYMESH_FAULT_INJECTION=1``, and then only with the admin token; ``/metrics``, ``/healthz``
and ``/breakers`` stay readable without credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh.admin_token import (
    ADMIN_TOKEN_FILE_VAR,
    FAULT_INJECTION_VAR,
    admin_authorization,
    with_admin_token,
)
from services.mesh.bootstrap import StartupError
from services.order.__main__ import build
from services.tools.launcher import free_port
from tests.servers import mesh_channel, running_service

GET_ORDER = "/paymesh.order.v1.OrderService/GetOrder"


@dataclass(frozen=True, slots=True)
class Service:
    """A running order-service: its stub, admin address and the environ it started with."""

    stub: order_pb2_grpc.OrderServiceAsyncStub
    admin: str
    environ: Mapping[str, str]

    async def call(
        self, method: str, path: str, body: object = None, *, token: bool = True
    ) -> tuple[int, dict[str, object]]:
        """One admin request; with ``token``, carrying the admin token like the tooling."""
        headers = admin_authorization(self.environ) if token else {}
        return await asyncio.to_thread(_admin, self.admin, method, path, body, headers)


def _admin(
    admin: str, method: str, path: str, body: object, headers: Mapping[str, str]
) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://{admin}{path}", data=data, method=method, headers=dict(headers)
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, _json(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}
    return value if isinstance(value, dict) else {"value": value}


@pytest.fixture
def fault_environ(tmp_path: Path) -> dict[str, str]:
    """Fault injection on, with an admin token file as the launcher writes it."""
    return with_admin_token({"PAYMESH_VAR_DIR": str(tmp_path), FAULT_INJECTION_VAR: "1"}, tmp_path)


async def _running(environ: Mapping[str, str]) -> AsyncIterator[Service]:
    admin = f"127.0.0.1:{free_port()}"
    env = {**environ, "ORDER_SERVICE_ADMIN_ADDR": admin}
    async with running_service("order-service", build, environ=env) as address:
        async with mesh_channel(address) as channel:
            yield Service(order_pb2_grpc.OrderServiceStub(channel), admin, env)


@pytest.fixture
async def order_service(fault_environ: dict[str, str]) -> AsyncIterator[Service]:
    async for service in _running(fault_environ):
        yield service


@pytest.fixture
async def order_service_without_faults(
    fault_environ: dict[str, str],
) -> AsyncIterator[Service]:
    # The token file exists and is named, but the switch is off.
    async for service in _running({**fault_environ, FAULT_INJECTION_VAR: "0"}):
        yield service


async def test_abort_fault_fails_the_method_with_its_code(order_service: Service) -> None:
    status, _ = await order_service.call(
        "PUT", "/faults", [{"method": GET_ORDER, "abort_code": "unavailable"}]
    )
    assert status == 200
    with pytest.raises(aio.AioRpcError) as caught:
        await order_service.stub.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Other methods are untouched.
    await order_service.stub.ListOrders(order_pb2.ListOrdersRequest())


async def test_delay_fault_delays_and_clearing_restores(order_service: Service) -> None:
    # The delay is far beyond the deadline of every call below: a fault left in place fails
    # the call after clearing too, however slow the machine.
    await order_service.call(
        "PUT", "/faults", [{"method": "/paymesh.order.v1.OrderService/*", "delay_ms": 30_000}]
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await order_service.stub.ListOrders(order_pb2.ListOrdersRequest(), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status, body = await order_service.call("DELETE", "/faults")
    assert (status, body) == (200, {"faults": []})
    assert await order_service.call("GET", "/faults") == (200, {"faults": []})
    await order_service.stub.ListOrders(order_pb2.ListOrdersRequest(), timeout=10)


async def test_cleared_abort_fault_lets_the_method_answer_again(order_service: Service) -> None:
    await order_service.call("PUT", "/faults", [{"method": GET_ORDER, "abort_code": "UNAVAILABLE"}])
    with pytest.raises(aio.AioRpcError) as caught:
        await order_service.stub.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await order_service.call("DELETE", "/faults"))[0] == 200
    assert await order_service.call("GET", "/faults") == (200, {"faults": []})
    with pytest.raises(aio.AioRpcError) as answered:
        await order_service.stub.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    assert answered.value.code() == grpc.StatusCode.NOT_FOUND  # the service's own answer


async def test_bad_fault_is_a_400_naming_the_problem(order_service: Service) -> None:
    status, body = await order_service.call("PUT", "/faults", [{"method": GET_ORDER, "rate": 2}])
    assert status == 400
    assert "rate" in str(body)
    status, body = await order_service.call("PUT", "/faults", [{"methd": GET_ORDER}])
    assert status == 400
    assert "methd" in str(body)


async def test_faults_without_a_token_are_401_and_change_nothing(order_service: Service) -> None:
    for method, body in (("PUT", [{"abort_code": "UNAVAILABLE"}]), ("DELETE", None), ("GET", None)):
        status, answer = await order_service.call(method, "/faults", body, token=False)
        assert (status, answer["reason"]) == (401, "CREDENTIALS_MISSING"), method
    await order_service.stub.ListOrders(order_pb2.ListOrdersRequest())
    assert await order_service.call("GET", "/faults") == (200, {"faults": []})


async def test_faults_with_a_wrong_token_are_401(order_service: Service) -> None:
    wrong = {"Authorization": "Bearer " + "x" * 43}
    status, answer = await asyncio.to_thread(
        _admin, order_service.admin, "PUT", "/faults", [{"abort_code": "UNAVAILABLE"}], wrong
    )
    assert (status, answer["reason"]) == (401, "ADMIN_TOKEN_INVALID")
    await order_service.stub.ListOrders(order_pb2.ListOrdersRequest())


async def test_faults_are_403_when_fault_injection_is_off_even_with_the_token(
    order_service_without_faults: Service,
) -> None:
    service = order_service_without_faults
    status, answer = await service.call("PUT", "/faults", [{"abort_code": "UNAVAILABLE"}])
    assert (status, answer["reason"]) == (403, "FAULT_INJECTION_DISABLED")
    assert FAULT_INJECTION_VAR in str(answer["error"])
    await service.stub.ListOrders(order_pb2.ListOrdersRequest())


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/breakers"])
async def test_read_only_routes_need_no_credentials(
    order_service_without_faults: Service, path: str
) -> None:
    status, _ = await order_service_without_faults.call("GET", path, token=False)
    assert status == 200


async def test_the_token_never_reaches_the_log(
    order_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = admin_authorization(order_service.environ)["Authorization"].split()[1]
    await order_service.call("PUT", "/faults", [{"method": GET_ORDER, "delay_ms": 1}])
    await order_service.call("DELETE", "/faults", token=False)
    wrong = {"Authorization": f"Bearer {token[:-1]}"}
    await asyncio.to_thread(_admin, order_service.admin, "DELETE", "/faults", None, wrong)
    assert "refused DELETE /faults" in caplog.text
    assert token not in caplog.text
    assert token[:-1] not in caplog.text


async def test_fault_injection_without_a_token_file_refuses_to_start(tmp_path: Path) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), FAULT_INJECTION_VAR: "1"}
    with pytest.raises(StartupError, match=ADMIN_TOKEN_FILE_VAR):
        async with running_service("order-service", build, environ=environ):
            pass


@pytest.fixture
def readable_token_environ(fault_environ: dict[str, str]) -> dict[str, str]:
    """As :func:`fault_environ`, but the token file is readable by everyone."""
    Path(fault_environ[ADMIN_TOKEN_FILE_VAR]).chmod(0o644)
    return fault_environ


async def test_a_token_file_others_can_read_refuses_to_start(
    readable_token_environ: dict[str, str],
) -> None:
    with pytest.raises(StartupError, match="chmod 600"):
        async with running_service("order-service", build, environ=readable_token_environ):
            pass
