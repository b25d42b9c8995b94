"""The plaintext health-only port kubelet probes: health answers there, nothing else does, and
the drain's NOT_SERVING shows there as on the mesh port; the listen address is not the dialed one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh.bootstrap import READY_MARKER, StartupError, serve
from services.mesh.diagnostics import DIAGNOSTICS_SERVICE
from services.mesh.tls import PKI_DIR_VAR
from services.mesh.topology import Topology
from services.order.servicer import OrderServicer
from services.tools.ports import free_port
from tests import servers
from tests.integration.test_bootstrap import ORDER_SERVICE, SlowOrders, _builder
from tests.servers import granted_stub

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _environ(health: str) -> dict[str, str]:
    return {
        "ORDER_SERVICE_ADDR": "127.0.0.1:0",
        "ORDER_SERVICE_ADMIN_ADDR": "127.0.0.1:0",
        "ORDER_SERVICE_HEALTH_ADDR": health,
        PKI_DIR_VAR: str(servers.test_pki_dir()),
    }


async def _check(channel: aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _code_of(channel: aio.Channel, method: str, request: bytes = b"") -> grpc.StatusCode:
    call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    with pytest.raises(aio.AioRpcError) as caught:
        await call(request, timeout=5)
    return caught.value.code()


@asynccontextmanager
async def _served(
    tmp_path: Path, servicer: type[OrderServicer] = OrderServicer, **attrs: object
) -> AsyncIterator[tuple[str, str, asyncio.Event, asyncio.Task[None]]]:
    """The order service with its health port on a free port: mesh address, health address,
    the stop event and the serving task."""
    health = f"127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            "order-service",
            _builder(servicer, tmp_path, **attrs),
            topology=Topology(environ=_environ(health)),
            grace_s=5.0,
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    starting: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(starting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield ready.result(), health, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_health_port_answers_liveness_and_readiness_in_plaintext(tmp_path: Path) -> None:
    async with _served(tmp_path) as (_, health, _stop, _task):
        async with aio.insecure_channel(health) as channel:
            liveness = await _check(channel, "")
            readiness = await _check(channel, ORDER_SERVICE)

    assert (liveness, readiness) == (SERVING, SERVING)


@pytest.mark.parametrize(
    "method",
    [
        "/paymesh.order.v1.OrderService/GetOrder",
        f"/{DIAGNOSTICS_SERVICE}/GetDiagnostics",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_health_port_serves_no_other_method(tmp_path: Path, method: str) -> None:
    request = order_pb2.GetOrderRequest(order_id="o1").SerializeToString()
    async with _served(tmp_path) as (_, health, _stop, _task):
        async with aio.insecure_channel(health) as channel:
            code = await _code_of(channel, method, request)

    assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_has_no_reflection_stream(tmp_path: Path) -> None:
    async with _served(tmp_path) as (_, health, _stop, _task):
        async with aio.insecure_channel(health) as channel:
            call = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            stream = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            with pytest.raises(aio.AioRpcError) as caught:
                _ = [reply async for reply in stream]

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_turns_not_serving_while_calls_drain(tmp_path: Path) -> None:
    started = asyncio.Event()
    async with _served(tmp_path, SlowOrders, started=started) as (address, health, stop, task):
        async with (
            granted_stub(address, order_pb2_grpc.OrderServiceStub, "order-service") as orders,
            aio.insecure_channel(health) as channel,
        ):
            in_flight = asyncio.ensure_future(
                orders.GetOrder(order_pb2.GetOrderRequest(order_id="o1"), timeout=10)
            )
            await started.wait()
            stop.set()
            liveness = await _poll_status(channel, "", NOT_SERVING)
            readiness = await _check(channel, ORDER_SERVICE)
            # Seen while the call is still in flight: the grace period has not ended.
            assert not in_flight.done() and not task.done()
            reply = await in_flight

    assert (liveness, readiness) == (NOT_SERVING, NOT_SERVING)
    assert reply.order.order_id == "o1"


async def _poll_status(channel: aio.Channel, service: str, wanted: int) -> int:
    """The status of ``service``, asked until it is ``wanted`` (5 s at most)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        status = await _check(channel, service)
        if status == wanted or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.02)


async def test_taken_health_port_is_a_startup_error_naming_the_variable(tmp_path: Path) -> None:
    async with _served(tmp_path) as (_, health, _stop, _task):
        with pytest.raises(StartupError, match=r"ORDER_SERVICE_HEALTH_ADDR=.*cannot listen"):
            await serve(
                "order-service",
                _builder(OrderServicer, tmp_path),
                topology=Topology(environ=_environ(health)),
                stop=asyncio.Event(),
            )


def test_listen_address_is_bound_instead_of_the_dialed_one() -> None:
    topology = Topology(
        environ={
            "ORDER_SERVICE_ADDR": "order-service.paymesh.svc:40004",
            "ORDER_SERVICE_LISTEN_ADDR": "0.0.0.0:40004",
        }
    )

    assert topology.bind_address("order-service") == ("0.0.0.0", 40004)
    assert topology.address("order-service") == "order-service.paymesh.svc:40004"


def test_without_a_listen_address_the_dialed_one_is_bound() -> None:
    topology = Topology(environ={"ORDER_SERVICE_ADDR": "127.0.0.1:41234"})

    assert topology.bind_address("order-service") == ("127.0.0.1", 41234)
    assert topology.health_address("order-service") is None


@contextmanager
def _process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """``python -m services.order`` listening where LISTEN_ADDR says (ADDR names a port
    nothing serves) with its health port on port 0; yields it and its ready line's fields."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "gen"))),
        PKI_DIR_VAR: str(servers.test_pki_dir()),
        "PAYMESH_VAR_DIR": str(tmp_path),
        "OTEL_TRACES_EXPORTER": "none",
        "ORDER_SERVICE_ADDR": "127.0.0.1:1",
        "ORDER_SERVICE_LISTEN_ADDR": "127.0.0.1:0",
        "ORDER_SERVICE_ADMIN_ADDR": "127.0.0.1:0",
        "ORDER_SERVICE_HEALTH_ADDR": "127.0.0.1:0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.order"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        fields: dict[str, str] = {}
        for line in process.stdout:  # ends when the process does, so never hangs forever
            if line.startswith(READY_MARKER):
                fields = dict(item.split("=", 1) for item in line.split()[1:])
                break
        assert fields, f"no ready line; exit {process.wait(timeout=10)}"
        yield process, fields
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


async def test_service_process_serves_its_health_port_and_binds_its_listen_address(
    tmp_path: Path,
) -> None:
    with _process(tmp_path) as (process, fields):
        async with aio.insecure_channel(fields["health"]) as channel:
            liveness = await _check(channel, "")
            readiness = await _check(channel, ORDER_SERVICE)
            diagnostics = await _code_of(channel, f"/{DIAGNOSTICS_SERVICE}/GetDiagnostics")
        async with servers.mesh_channel(fields["address"]) as mesh:  # mTLS on the listen port
            over_mesh = await _check(mesh, ORDER_SERVICE)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)

    assert fields["address"] != "127.0.0.1:1"
    assert (liveness, readiness, over_mesh) == (SERVING, SERVING, SERVING)
    assert diagnostics == grpc.StatusCode.UNIMPLEMENTED
    assert code == 0
