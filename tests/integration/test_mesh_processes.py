"""The eleven services as real processes on free loopback ports, probed as an operator would.

Health through generated stubs, reflection and a real RPC through ``buf curl`` over mTLS with
the operator certificate (exactly as the README shows), and a clean SIGTERM: health turns
NOT_SERVING (or the connection closes) and the process exits 0.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import Mesh, MeshError, ephemeral_environ, health_status
from services.tls import operator_security
from services.topology import SERVICES, ServiceSpec

BUF = Path(sys.executable).parent / "buf"
PROTOS = Path(__file__).resolve().parents[2] / "protos"

#: One read RPC per service with a request it answers from its own store (or partner).
READS: dict[str, tuple[str, dict[str, str]]] = {
    "merchant-service": ("paymesh.merchant.v1.MerchantService/ListMerchants", {}),
    "payment-gateway": (
        "paymesh.payment_gateway.v1.PaymentGatewayService/ListPayments",
        {"merchant_id": "m_1"},
    ),
    "order-service": ("paymesh.order.v1.OrderService/ListOrders", {}),
    "channel-adapter": (
        "paymesh.channel_adapter.v1.ChannelAdapterService/GetExchangeRate",
        {"source_currency_code": "USD", "target_currency_code": "JPY"},
    ),
    "risk-service": ("paymesh.risk.v1.RiskService/GetRiskSummary", {"merchant_id": "m_1"}),
    "accounting-service": (
        "paymesh.accounting.v1.AccountingService/GetBalance",
        {"account_id": "platform/psp_clearing", "currency_code": "USD"},
    ),
    "notification-service": (
        "paymesh.notification.v1.NotificationService/ListNotifications",
        {"merchant_id": "m_1"},
    ),
    "analytics-service": (
        "paymesh.analytics.v1.AnalyticsService/GetMerchantStats",
        {"merchant_id": "m_1"},
    ),
    "merchant-auth-service": (
        "paymesh.merchant_auth.v1.MerchantAuthService/ListApiKeys",
        {"merchant_id": "m_1"},
    ),
    "settlement-service": (
        "paymesh.settlement.v1.SettlementService/ListSettlements",
        {"merchant_id": "m_1"},
    ),
    "withdrawal-service": (
        "paymesh.withdrawal.v1.WithdrawalService/ListWithdrawals",
        {"merchant_id": "m_1"},
    ),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(environ=ephemeral_environ(), var_dir=tmp_path_factory.mktemp("mesh"))
    running.start(timeout_s=90)
    try:
        yield running
    finally:
        running.stop()


def _buf_curl(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    files = mesh.operator.files
    assert files is not None
    tls = ("--cacert", str(files.ca), "--cert", str(files.cert), "--key", str(files.key))
    return subprocess.run(
        [str(BUF), "curl", "--protocol", "grpc", *tls, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _spec_ids() -> list[str]:
    return [s.name for s in SERVICES]


@pytest.mark.parametrize("spec", SERVICES, ids=_spec_ids())
def test_health_check_is_serving_for_overall_and_own_service(mesh: Mesh, spec: ServiceSpec) -> None:
    address = mesh.members[spec.name].address
    with mesh.operator.sync_channel(spec.name, address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *spec.proto_services):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("spec", SERVICES, ids=_spec_ids())
def test_buf_curl_lists_every_rpc_through_reflection(mesh: Mesh, spec: ServiceSpec) -> None:
    result = _buf_curl(mesh, "--list-methods", f"https://{mesh.members[spec.name].address}")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    pool = descriptor_pool.Default()
    for full_name in spec.proto_services:
        package = full_name.rsplit(".", 1)[0]
        importlib.import_module(f"{package}.{package.split('.')[1]}_pb2")
        service = pool.FindServiceByName(full_name)
        expected = {f"{full_name}/{m.name}" for m in service.methods}
        assert expected <= listed, expected - listed
    assert "grpc.health.v1.Health/Check" in listed


@pytest.mark.parametrize("spec", SERVICES, ids=_spec_ids())
def test_buf_curl_gets_a_json_answer_from_a_real_rpc(mesh: Mesh, spec: ServiceSpec) -> None:
    method, body = READS[spec.name]
    address = mesh.members[spec.name].address
    result = _buf_curl(mesh, "-d", json.dumps(body), f"https://{address}/{method}")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), dict)


def test_exchange_rate_answer_comes_from_the_partner(mesh: Mesh) -> None:
    method, body = READS["channel-adapter"]
    result = _buf_curl(
        mesh, "-d", json.dumps(body), f"https://{mesh.members['channel-adapter'].address}/{method}"
    )
    assert json.loads(result.stdout)["exchangeRate"]["rate"] == "151.300000"


def test_sigterm_turns_health_not_serving_and_exits_zero(tmp_path: Path) -> None:
    single = Mesh(
        environ=ephemeral_environ(),
        names=["order-service"],
        var_dir=tmp_path,
        with_sandbox=False,
    )
    single.start(timeout_s=60)
    member = single.members["order-service"]
    assert member.process is not None
    with single.operator.sync_channel("order-service", member.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        member.process.send_signal(signal.SIGTERM)
        seen = []
        with contextlib.suppress(grpc.RpcError):  # a closed stream is "not serving" too
            for update in watch:
                seen.append(update.status)
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    watch.cancel()
    code = member.process.wait(timeout=30)
    assert code == 0, member.log_tail()
    assert time.monotonic() - started < 30
    assert not seen or seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_status(member.address, security=single.operator, target="order-service") in (
        "UNAVAILABLE",
        "NOT_SERVING",
    )
    assert "Traceback" not in member.log_path.read_text()


def test_every_service_exits_zero_on_sigterm(tmp_path: Path) -> None:
    fleet = Mesh(environ=ephemeral_environ(), var_dir=tmp_path)
    fleet.start(timeout_s=90)
    codes = fleet.stop()
    assert codes == {name: 0 for name in fleet.members}
    for member in fleet.members.values():
        assert "Traceback" not in member.log_path.read_text(), member.name


def test_taken_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    environ = ephemeral_environ()
    with socket_holding(environ["ORDER_SERVICE_ADDR"]):
        fleet = Mesh(environ=environ, var_dir=tmp_path)
        with pytest.raises(MeshError, match=r"order-service"):
            fleet.start(timeout_s=30)
    assert not [m for m in fleet.members.values() if m.process is not None]


def test_service_that_dies_at_start_is_named(tmp_path: Path) -> None:
    environ = ephemeral_environ()
    environ["ORDER_SERVICE_DATABASE_URL"] = "postgres://nowhere/orders"
    fleet = Mesh(environ=environ, names=["order-service"], var_dir=tmp_path, with_sandbox=False)
    with pytest.raises(MeshError, match=r"(?s)order-service exited with code 2.*DATABASE_URL"):
        fleet.start(timeout_s=30)


def test_make_run_front_door_reports_a_taken_port_and_exits_nonzero(tmp_path: Path) -> None:
    environ = ephemeral_environ()
    environ["PAYMESH_VAR_DIR"] = str(tmp_path)
    with socket_holding(environ["RISK_SERVICE_ADDR"]):
        result = subprocess.run(
            [sys.executable, "-m", "services"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert "risk-service" in result.stderr
    assert "Traceback" not in result.stderr


class socket_holding:
    """Listen on ``host:port`` for the duration of a ``with`` block."""

    def __init__(self, address: str) -> None:
        import socket

        host, port = address.rsplit(":", 1)
        self._sock = socket.socket()
        self._sock.bind((host, int(port)))
        self._sock.listen()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_make_run_front_door_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    environ = ephemeral_environ()
    environ["PAYMESH_VAR_DIR"] = str(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "services"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert launcher.stdout is not None
    lines: list[str] = []
    for line in launcher.stdout:
        lines.append(line)
        if "mesh is up" in line:
            break
    assert any("mesh is up" in line for line in lines), "".join(lines)
    assert sum("SERVING" in line for line in lines) == len(SERVICES) + 1  # and the sandbox
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
    rest, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    assert "Traceback" not in "".join(lines) + rest
    operator = operator_security(environ)
    for spec in SERVICES:
        status = health_status(environ[spec.addr_var], security=operator, target=spec.name)
        assert status == "UNAVAILABLE", spec.name
    for log in (tmp_path / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name


def test_a_plaintext_client_is_refused_on_every_mesh_port(mesh: Mesh) -> None:
    for spec in SERVICES:
        assert health_status(mesh.members[spec.name].address) == "UNAVAILABLE", spec.name


def test_buf_curl_without_a_client_certificate_is_refused(mesh: Mesh) -> None:
    files = mesh.operator.files
    assert files is not None
    method, body = READS["order-service"]
    url = f"https://{mesh.members['order-service'].address}/{method}"
    result = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--schema",
            str(PROTOS),
            "--cacert",
            str(files.ca),
            "-d",
            json.dumps(body),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower() or "unavailable" in result.stderr.lower()
