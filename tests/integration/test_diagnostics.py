"""Real services in the test's loop: /metrics on the admin port, the Diagnostics report of
partners and the own database, and readiness that follows the database while liveness stays."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services import pki
from services.launcher import free_port
from services.order.__main__ import build as build_order
from services.risk.__main__ import build as build_risk
from tests.servers import granted_stub, mesh_channel, running_sandbox, running_service

ORDER_SERVICE = "paymesh.order.v1.OrderService"


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def _remove_database(var_dir: Path) -> None:
    for path in var_dir.glob("order-service.db*"):
        path.unlink()


async def _diagnostics(address: str) -> mesh_pb2.GetDiagnosticsResponse:
    async with mesh_channel(address, as_=pki.OPERATOR) as channel:  # the operator's RPC
        stub = mesh_pb2_grpc.DiagnosticsServiceStub(channel)
        return await stub.GetDiagnostics(mesh_pb2.GetDiagnosticsRequest(), timeout=5)


async def _health(address: str, service: str) -> int:
    async with mesh_channel(address, as_=pki.OPERATOR) as channel:  # as the launcher probes
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_metrics_endpoint_serves_prometheus_text_counting_real_rpcs(tmp_path: Path) -> None:
    admin = f"127.0.0.1:{free_port()}"
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "ORDER_SERVICE_ADMIN_ADDR": admin}
    async with running_service("order-service", build_order, environ=environ) as address:
        async with granted_stub(
            address, order_pb2_grpc.OrderServiceStub, "order-service"
        ) as orders:
            await orders.ListOrders(order_pb2.ListOrdersRequest(), timeout=5)
        content_type, text = await asyncio.to_thread(_get, f"http://{admin}/metrics")

    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, s.labels.get("method"), s.labels.get("code")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("service") == "order-service"
    }
    list_orders = f"/{ORDER_SERVICE}/ListOrders"
    assert samples[("paymesh_server_rpcs_total", list_orders, "OK")] == 1
    assert samples[("paymesh_server_rpc_duration_seconds_count", list_orders, None)] == 1


async def test_diagnostics_reports_a_reachable_partner_and_the_own_database(
    tmp_path: Path,
) -> None:
    with running_sandbox() as (sandbox, _state):
        environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": sandbox}
        async with running_service("risk-service", build_risk, environ=environ) as address:
            report = await _diagnostics(address)

    assert report.service_name == "risk-service"
    by_name = {d.name: d for d in report.dependencies}
    assert list(by_name) == ["geo-ip", "database"]
    geo_ip, database = by_name["geo-ip"], by_name["database"]
    assert geo_ip.kind == mesh_pb2.DEPENDENCY_KIND_HTTP_PARTNER
    assert geo_ip.health == mesh_pb2.DEPENDENCY_HEALTH_SERVING
    assert geo_ip.breaker_state == mesh_pb2.BREAKER_STATE_CLOSED
    assert geo_ip.target == f"http://{sandbox}/geo-ip"
    assert database.kind == mesh_pb2.DEPENDENCY_KIND_DATABASE
    assert database.health == mesh_pb2.DEPENDENCY_HEALTH_SERVING
    assert database.target == str(tmp_path / "risk-service.db")


async def test_diagnostics_reports_an_unreachable_partner_without_failing_liveness(
    tmp_path: Path,
) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": nobody}
    async with running_service("risk-service", build_risk, environ=environ) as address:
        report = await _diagnostics(address)
        liveness = await _health(address, "")

    geo_ip = next(d for d in report.dependencies if d.name == "geo-ip")
    assert geo_ip.health == mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE
    assert geo_ip.last_error, "the failed check says why"
    assert liveness == health_pb2.HealthCheckResponse.SERVING


async def test_readiness_follows_the_own_database_while_liveness_stays_serving(
    tmp_path: Path,
) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PAYMESH_READINESS_INTERVAL_S": "0.05"}
    async with running_service("order-service", build_order, environ=environ) as address:
        assert await _health(address, ORDER_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.to_thread(_remove_database, tmp_path)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await _health(address, ORDER_SERVICE) != health_pb2.HealthCheckResponse.NOT_SERVING:
            if loop.time() > deadline:
                pytest.fail("readiness did not turn NOT_SERVING after the database went away")
            await asyncio.sleep(0.05)  # polling for the state, bounded by the deadline
        liveness = await _health(address, "")
        report = await _diagnostics(address)

    assert liveness == health_pb2.HealthCheckResponse.SERVING
    database = next(d for d in report.dependencies if d.name == "database")
    assert database.health == mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING
    assert database.last_error
