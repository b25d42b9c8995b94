"""The shared bootstrap: health with List, reflection v1 and v1alpha, graceful stop, errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from interceptors.errors import STATUS_DETAILS_KEY
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh import bootstrap
from services.mesh.bootstrap import Context, Registration, ServiceContext, StartupError, serve
from services.mesh.tls import PKI_DIR_VAR
from services.mesh.topology import Topology
from services.order.servicer import OrderServicer
from services.order.store import OrderStore
from tests import servers
from tests.servers import granted_stub, mesh_channel, running_service

ORDER_SERVICE = "paymesh.order.v1.OrderService"


class SlowOrders(OrderServicer):
    """GetOrder takes a while, so a stop can begin while it is in flight."""

    started: asyncio.Event

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        self.started.set()
        await asyncio.sleep(0.5)
        return order_pb2.GetOrderResponse(order=order_pb2.Order(order_id=request.order_id))


class CrashingOrders(OrderServicer):
    """GetOrder fails with a bug, as real code sometimes does."""

    async def GetOrder(
        self, request: order_pb2.GetOrderRequest, context: Context
    ) -> order_pb2.GetOrderResponse:
        raise KeyError("a bug")


def _environ(address: str) -> dict[str, str]:
    """Overrides of a service started with ``serve`` itself: its address, an ephemeral admin
    port and the test PKI (never ``var/pki`` of the working tree)."""
    return {
        "ORDER_SERVICE_ADDR": address,
        "ORDER_SERVICE_ADMIN_ADDR": "127.0.0.1:0",
        PKI_DIR_VAR: str(servers.test_pki_dir()),
    }


def _builder(servicer_type: type[OrderServicer], tmp_path: Path, **attrs: object):  # type: ignore[no-untyped-def]
    def build(context: ServiceContext) -> list[Registration]:
        servicer = servicer_type(OrderStore(tmp_path / "orders.db"))
        for key, value in attrs.items():
            setattr(servicer, key, value)
        return [
            Registration(
                servicer=servicer,
                add_to_server=order_pb2_grpc.add_OrderServiceServicer_to_server,
                service_name=ORDER_SERVICE,
            )
        ]

    return build


async def test_health_lists_overall_and_own_services(tmp_path: Path) -> None:
    async with running_service("order-service", _builder(OrderServicer, tmp_path)) as address:
        async with mesh_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            listed = await health.List(health_pb2.HealthListRequest())
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        ORDER_SERVICE: health_pb2.HealthCheckResponse.SERVING,
    }
    assert overall.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_describes_the_service(tmp_path: Path, version: str) -> None:
    async with running_service("order-service", _builder(OrderServicer, tmp_path)) as address:
        async with mesh_channel(address) as channel:  # reflection is for verified identities
            method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
            call = channel.stream_stream(
                method,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=ORDER_SERVICE),
            ]
            replies = [reply async for reply in call(iter(requests))]
    services = {s.name for s in replies[0].list_services_response.service}
    assert ORDER_SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_stop_lets_calls_in_flight_finish_and_turns_health_not_serving(
    tmp_path: Path,
) -> None:
    started = asyncio.Event()
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    environ = _environ("127.0.0.1:0")
    server = asyncio.create_task(
        serve(
            "order-service",
            _builder(SlowOrders, tmp_path, started=started),
            topology=Topology(environ=environ),
            grace_s=5.0,
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    address = await ready
    async with (
        granted_stub(address, order_pb2_grpc.OrderServiceStub, "order-service") as orders,
        mesh_channel(address) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            orders.GetOrder(order_pb2.GetOrderRequest(order_id="o1"), timeout=10)
        )
        await started.wait()
        stop.set()
        update = await asyncio.wait_for(watch.read(), timeout=5)
        # Observed while the call is still in flight and the server still running: health
        # turns first, then the grace period lets the call finish.
        assert update != aio.EOF
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not in_flight.done() and not server.done()
        # Having carried NOT_SERVING, the stream ends with OK instead of waiting for a change
        # that cannot come (its handler would be left for the closing event loop to cancel).
        assert await asyncio.wait_for(watch.read(), timeout=5) == aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        reply = await in_flight
    await asyncio.wait_for(server, timeout=10)
    assert reply.order.order_id == "o1"


async def test_stop_waits_for_its_own_ended_calls_not_for_another_servers_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two services in one event loop (as the tests run the mesh): the second's health watcher
    # stays open while the first stops. The stop settles the calls it ended and moves on; it
    # must not wait out its whole settling bound on a stream of a server that still serves.
    monkeypatch.setattr(bootstrap, "RPC_SETTLE_S", 30.0)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    async with running_service("order-service", _builder(OrderServicer, other_dir)) as other:
        async with mesh_channel(other) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stop = asyncio.Event()
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            server = asyncio.create_task(
                serve(
                    "order-service",
                    _builder(OrderServicer, tmp_path),
                    topology=Topology(environ=_environ("127.0.0.1:0")),
                    grace_s=0.1,
                    stop=stop,
                    on_ready=ready.set_result,
                )
            )
            address = await ready
            async with mesh_channel(address) as own:
                own_watch = health_pb2_grpc.HealthStub(own).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=60
                )
                assert (await own_watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                loop = asyncio.get_running_loop()
                began = loop.time()
                stop.set()
                await asyncio.wait_for(server, timeout=30)
                stopped_in = loop.time() - began
            # Its own watcher ended with the stop; the other server's is still open and served.
            assert stopped_in < 15, stopped_in  # the bound is 30 s
            other_health = health_pb2_grpc.HealthStub(channel)
            checked = await other_health.Check(health_pb2.HealthCheckRequest(service=""))
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            assert not watch.done()
            watch.cancel()


async def test_unexpected_exception_is_internal_with_error_info_and_no_traceback(
    tmp_path: Path,
) -> None:
    async with (
        running_service("order-service", _builder(CrashingOrders, tmp_path)) as address,
        granted_stub(address, order_pb2_grpc.OrderServiceStub, "order-service") as orders,
    ):
        with pytest.raises(aio.AioRpcError) as caught:
            await orders.GetOrder(order_pb2.GetOrderRequest(order_id="o1"))
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in (error.details() or "")
    assert "KeyError" not in (error.details() or "")
    details = dict(error.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    assert isinstance(details, bytes)
    status = status_pb2.Status.FromString(details)
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.reason, info.domain) == ("INTERNAL_ERROR", "order-service")


async def test_taken_port_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        environ = _environ(f"127.0.0.1:{port}")
        with pytest.raises(StartupError, match="cannot listen"):
            await serve(
                "order-service",
                _builder(OrderServicer, tmp_path),
                topology=Topology(environ=environ),
                stop=asyncio.Event(),
            )


async def test_missing_declared_service_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="must serve"):
        await serve(
            "order-service",
            lambda context: [],
            topology=Topology(environ=_environ("127.0.0.1:0")),
            stop=asyncio.Event(),
        )


async def test_watcher_woken_between_shutdown_flag_and_status_still_carries_not_serving() -> None:
    # grpcio-health-checking raises its shutdown flag before it turns each status. A watcher
    # woken in between (here by an unchanged SERVING set just then) must wait for NOT_SERVING
    # and carry it before its stream ends, or a client sees a stream end with no reason.
    health = bootstrap.MeshHealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            health._gracefully_shutting_down = True  # the library's first step
            condition = health._server_watchers[""]
            async with condition:  # a set that changes nothing wakes the watcher
                condition.notify_all()
            await asyncio.sleep(0.2)  # the woken watcher looks while the status is unchanged
            assert not watch.done()
            await health._set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # its next step
            update = await asyncio.wait_for(watch.read(), timeout=10)
            assert update != aio.EOF
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await asyncio.wait_for(watch.read(), timeout=10) == aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
    finally:
        await server.stop(None)


#: A service process whose serve() stands in for the real one: it reports the collector's
#: frozen count before and after start-up says it is ready, as run() wires it.
_FROZEN_PROBE = """
import gc
from services.mesh import bootstrap

async def serve(name, build, *, on_ready, **kwargs):
    print("before", gc.get_freeze_count())
    on_ready("127.0.0.1:1")
    print("after", gc.get_freeze_count())

bootstrap.serve = serve
bootstrap.run("order", lambda context: [])
"""


def test_a_service_process_freezes_its_start_up_heap_once_ready() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FROZEN_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = dict(line.split() for line in result.stdout.splitlines())
    assert int(counts["before"]) == 0
    assert int(counts["after"]) > 0
