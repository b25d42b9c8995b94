"""Real services in the test's loop: /metrics and /healthz on the admin port, the Diagnostics
report of partners and the own database with its overall status, and readiness that follows
the database while liveness stays."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from paymesh.common.v1 import common_pb2
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.risk.v1 import risk_pb2, risk_pb2_grpc
from services.mesh import pki
from services.mesh.bootstrap import StartupError
from services.mesh.diagnostics import Health, check_partner
from services.order.__main__ import build as build_order
from services.risk.__main__ import build as build_risk
from services.tools.launcher import free_port
from tests.servers import granted_stub, mesh_channel, running_sandbox, running_service

ORDER_SERVICE = "paymesh.order.v1.OrderService"


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def _healthz(admin: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{admin}/healthz", timeout=10) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


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
    with running_sandbox() as (sandbox, state):
        environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": sandbox}
        async with running_service("risk-service", build_risk, environ=environ) as address:
            report = await _diagnostics(address)
        # The probe reached the geo-IP partner's health route, not just any HTTP answer.
        assert state.health_probes == {"geo-ip": 1}

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


async def test_diagnostics_is_serving_when_every_dependency_serves(tmp_path: Path) -> None:
    with running_sandbox() as (sandbox, _state):
        environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": sandbox}
        async with running_service("risk-service", build_risk, environ=environ) as address:
            report = await _diagnostics(address)

    assert (report.status, report.status_reason) == (mesh_pb2.SERVICE_STATUS_SERVING, "")


async def test_diagnostics_is_degraded_naming_an_unreachable_partner(tmp_path: Path) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": f"127.0.0.1:{free_port()}"}
    async with running_service("risk-service", build_risk, environ=environ) as address:
        report = await _diagnostics(address)

    assert report.status == mesh_pb2.SERVICE_STATUS_DEGRADED
    assert report.status_reason == "geo-ip: UNREACHABLE"


async def test_diagnostics_is_not_serving_without_its_database(tmp_path: Path) -> None:
    async with running_service(
        "order-service", build_order, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
    ) as address:
        await asyncio.to_thread(_remove_database, tmp_path)
        report = await _diagnostics(address)

    assert report.status == mesh_pb2.SERVICE_STATUS_NOT_SERVING
    assert report.status_reason == "database: NOT_SERVING"


@contextlib.asynccontextmanager
async def _order_service_with_admin(tmp_path: Path, **extra: str) -> AsyncIterator[tuple[str, str]]:
    admin = f"127.0.0.1:{free_port()}"
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "ORDER_SERVICE_ADMIN_ADDR": admin, **extra}
    async with running_service("order-service", build_order, environ=environ) as address:
        yield address, admin


async def test_healthz_answers_ok_with_the_loop_lag_and_the_database(tmp_path: Path) -> None:
    async with _order_service_with_admin(tmp_path) as (_, admin):
        status, body = await asyncio.to_thread(_healthz, admin)

    assert status == 200
    assert (body["service"], body["status"], body["failed"]) == ("order-service", "ok", [])
    assert body["checks"]["event_loop"]["ok"] and body["checks"]["event_loop"]["lag_ms"] >= 0
    assert body["checks"]["database"] == {
        "ok": True,
        "health": "SERVING",
        "target": str(tmp_path / "order-service.db"),
        "error": "",
    }


async def test_healthz_is_503_naming_the_database_once_it_is_gone(tmp_path: Path) -> None:
    async with _order_service_with_admin(tmp_path) as (_, admin):
        await asyncio.to_thread(_remove_database, tmp_path)
        status, body = await asyncio.to_thread(_healthz, admin)

    assert status == 503
    assert (body["status"], body["failed"]) == ("failing", ["database"])
    assert body["checks"]["database"]["error"]
    assert body["checks"]["event_loop"]["ok"]


async def test_healthz_is_503_naming_the_event_loop_when_it_lags(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    blocking = True

    def hog() -> None:
        # Blocks the service's loop 50 ms at every turn, as a CPU-bound handler would.
        if blocking:
            time.sleep(0.05)
            loop.call_soon(hog)

    async with _order_service_with_admin(tmp_path, PAYMESH_HEALTHZ_MAX_LAG_S="0.02") as (_, admin):
        loop.call_soon(hog)
        try:
            status, body = await asyncio.to_thread(_healthz, admin)
        finally:
            blocking = False

    assert status == 503
    assert body["failed"] == ["event_loop"]
    assert body["checks"]["event_loop"]["lag_ms"] >= 20.0
    assert body["checks"]["event_loop"]["max_lag_ms"] == 20.0


async def test_a_bad_healthz_lag_limit_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="PAYMESH_HEALTHZ_MAX_LAG_S"):
        async with _order_service_with_admin(tmp_path, PAYMESH_HEALTHZ_MAX_LAG_S="0"):
            pass


GEO_IP_POLICY = """
[targets."geo-ip"]
timeout_s = 0.5

[targets."geo-ip".retry]
max_attempts = 1

[targets."geo-ip".breaker]
minimum_calls = 2
failure_rate = 0.5
open_s = 0.5
"""


async def test_a_breaker_whose_open_time_passed_reads_half_open_ready(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GEO_IP_POLICY)
    environ = {
        "PAYMESH_VAR_DIR": str(tmp_path),
        "PARTNER_SANDBOX_ADDR": f"127.0.0.1:{free_port()}",  # geo-ip refuses every call
        "PAYMESH_POLICY_FILE": str(policy),
    }
    async with running_service("risk-service", build_risk, environ=environ) as address:
        async with granted_stub(address, risk_pb2_grpc.RiskServiceStub, "risk-service") as risk:
            states: list[int] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not states or states[-1] != mesh_pb2.BREAKER_STATE_HALF_OPEN_READY:
                if loop.time() > deadline:
                    pytest.fail(f"the geo-ip breaker never read half-open-ready: {states}")
                if not states or states[-1] == mesh_pb2.BREAKER_STATE_CLOSED:
                    # A payment with an IP asks geo-ip; its failures open the breaker.
                    await risk.AssessPayment(
                        risk_pb2.AssessPaymentRequest(
                            request_id=f"r-{len(states)}",
                            merchant_id="m_1",
                            payment_id=f"pay_{len(states)}",
                            amount=common_pb2.Money(currency_code="USD", amount_minor=1000),
                            customer_ip="192.0.2.1",
                        ),
                        timeout=5,
                    )
                report = await _diagnostics(address)
                geo_ip = next(d for d in report.dependencies if d.name == "geo-ip")
                states.append(geo_ip.breaker_state)
                await asyncio.sleep(0.05)  # polling for the state, bounded by the deadline

    assert mesh_pb2.BREAKER_STATE_OPEN in states  # it was open before its time ran out
    assert report.status == mesh_pb2.SERVICE_STATUS_DEGRADED
    assert "geo-ip: UNREACHABLE, breaker HALF-OPEN-READY" in report.status_reason


@contextlib.asynccontextmanager
async def _partner(status: int, *, delay_s: float = 0.0) -> AsyncIterator[str]:
    """An HTTP partner on loopback whose ``/healthz`` answers ``status`` after ``delay_s``."""

    async def healthz(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "health"),
    [
        (200, Health.SERVING),
        (404, Health.SERVING),
        (499, Health.SERVING),
        (500, Health.NOT_SERVING),
        (503, Health.NOT_SERVING),
    ],
)
async def test_partner_check_is_serving_below_500_and_not_serving_from_it(
    status: int, health: Health
) -> None:
    async with _partner(status) as url:
        assert (await check_partner(url, timeout_s=5))[0] is health


async def test_partner_check_without_an_answer_in_time_is_unreachable() -> None:
    async with _partner(200, delay_s=5) as url:
        health, error = await check_partner(url, timeout_s=0.2)
    assert health is Health.UNREACHABLE and "no answer" in error


async def test_partner_check_of_a_closed_port_is_unreachable() -> None:
    async with _partner(200) as url:
        pass
    health, error = await check_partner(url, timeout_s=5)
    assert health is Health.UNREACHABLE and url in error


async def test_partner_check_takes_no_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with _partner(200) as url:
        assert await check_partner(url, timeout_s=5) == (Health.SERVING, "")
