"""The eleven services as real processes on free loopback ports, probed as an operator would.

Health through generated stubs, reflection and a real RPC through ``buf curl`` over mTLS with
the operator certificate (exactly as the README shows), and a clean SIGTERM: health turns
NOT_SERVING (or the connection closes) and the process exits 0. Under the real launcher
(``python -m services.tools.launcher``, as ``make run``):
a member killed with SIGKILL comes back SERVING by
itself while the others keep serving, and one that cannot stay up is reported crash-looping
while the launcher keeps running.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.tls import TransportSecurity, operator_security
from services.mesh.topology import SERVICES, ServiceSpec
from services.tools.launcher import Mesh, MeshError, ephemeral_environ, health_status
from tests.integration.harness import poll_until as _poll

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
        # The stream must carry NOT_SERVING before it ends: a stream that merely closes
        # (the process gone) would not show that health was turned during the stop.
        update = next(watch)
        alive_when_seen = member.process.poll() is None
        watch.cancel()
    code = member.process.wait(timeout=30)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert alive_when_seen  # seen during the graceful stop, before the process exited
    assert code == 0, member.log_tail()
    assert time.monotonic() - started < 30
    assert health_status(member.address, security=single.operator, target="order-service") in (
        "UNAVAILABLE",
        "NOT_SERVING",
    )
    log = member.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


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
    environ["ORDER_SERVICE_DATABASE_URL"] = "mysql://nowhere/orders"
    fleet = Mesh(environ=environ, names=["order-service"], var_dir=tmp_path, with_sandbox=False)
    with pytest.raises(MeshError, match=r"(?s)order-service exited with code 2.*DATABASE_URL"):
        fleet.start(timeout_s=30)


def _make_run(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``make run`` (the launcher) in ``environ`` until it exits, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "services.tools.launcher"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_run_front_door_reports_a_taken_port_and_exits_nonzero(tmp_path: Path) -> None:
    environ = ephemeral_environ()
    environ["PAYMESH_VAR_DIR"] = str(tmp_path)
    with socket_holding(environ["RISK_SERVICE_ADDR"]):
        result = _make_run(environ)
    assert result.returncode != 0
    assert "risk-service" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("PAYMESH_PORT_OFFSET", "ten", "is not an integer"),
        ("PAYMESH_PORT_OFFSET", "-40002", "outside 1-65535"),
        ("PAYMESH_LOG_FORMAT", "xml", "one of text, json"),
        ("PAYMESH_ACCESS_LOG_SAMPLE", "2", "fraction from 0 to 1"),
    ],
)
def test_make_run_refuses_a_bad_logging_or_port_setting_in_one_line(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    environ = ephemeral_environ()
    environ["PAYMESH_VAR_DIR"] = str(tmp_path)
    environ[variable] = value
    result = _make_run(environ)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"paymesh: {variable}=") and says in line, line
    assert "starting" not in result.stdout  # refused before any member started


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
        [sys.executable, "-m", "services.tools.launcher"],
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
    # The services, the partner sandbox and the mesh console, whose address follows the table.
    assert sum("SERVING" in line for line in lines) == len(SERVICES) + 2
    assert f"mesh console: http://{environ['PAYMESH_CONSOLE_ADDR']}/\n" in lines
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
    # The server drops the handshake; buf reports it as unavailable, a certificate error, or a
    # broken pipe, depending on when it notices. What matters: no answer, a failed call.
    assert result.returncode != 0
    assert result.stdout == ""
    assert any(w in result.stderr.lower() for w in ("certificate", "unavailable", "pipe"))


class Launcher:
    """The launcher as ``make run`` starts it, its stdout and stderr read as they come."""

    def __init__(self, var_dir: Path) -> None:
        self.environ = ephemeral_environ()
        self.environ["PAYMESH_VAR_DIR"] = str(var_dir)
        self.var_dir = var_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.tools.launcher"],
            env=self.environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._operator: TransportSecurity | None = None
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            assert stream is not None
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_up(self) -> None:
        _poll(
            "the launcher to say the mesh is up",
            lambda: self._alive() and any("mesh is up" in line for line in self.out),
            timeout_s=120,
        )

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the launcher exited {self.process.returncode}:\n{self.output()}")
        return True

    def report(self) -> dict[str, Any]:
        """``launcher.json``, by member."""
        text = (self.var_dir / "launcher.json").read_text()
        return {m["name"]: m for m in json.loads(text)["members"]}

    def health(self, name: str) -> str:
        # The operator's certificate exists once the launcher made the development PKI.
        self._operator = self._operator or operator_security(self.environ)
        return health_status(
            self.environ[f"{name.upper().replace('-', '_')}_ADDR"],
            security=self._operator,
            target=name,
        )

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.tools.status", *args],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    running = Launcher(tmp_path_factory.mktemp("launcher"))
    try:
        running.wait_up()
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.output()
        assert not (running.var_dir / "launcher.json").exists()  # nobody supervises now


def _others_serving(launcher: Launcher, *, but: str) -> bool:
    for spec in SERVICES:
        if spec.name != but:
            assert launcher.health(spec.name) == "SERVING", (spec.name, launcher.output())
    return True


def test_the_start_table_shows_restarts_and_last_exit(launcher: Launcher) -> None:
    header = next(line for line in launcher.out if line.startswith("service "))
    assert header.split()[-4:] == ["status", "restarts", "last", "exit"]
    row = next(line for line in launcher.out if line.startswith("order-service "))
    assert row.split()[-3:] == ["SERVING", "0", "-"]


def test_a_member_killed_with_sigkill_comes_back_serving_while_the_others_keep_serving(
    launcher: Launcher,
) -> None:
    victim = "order-service"
    before = launcher.report()[victim]
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> bool:
        _others_serving(launcher, but=victim)  # the rest keeps serving throughout
        member = launcher.report()[victim]
        return (
            member["restarts"] == before["restarts"] + 1
            and member["running"]
            and launcher.health(victim) == "SERVING"
        )

    _poll(f"{victim} to come back SERVING by itself", back)

    member = launcher.report()[victim]
    assert member["pid"] != before["pid"]
    assert (member["last_exit"], member["last_exit_code"]) == ("SIGKILL", -9)
    assert not member["crash_looping"]
    err = "".join(launcher.err)
    assert f"{victim} exited (SIGKILL)" in err and "restarting it in 1 s" in err
    _poll(
        "the launcher to say it serves again",
        lambda: any(f"{victim} is SERVING again" in line for line in launcher.out),
    )
    status = launcher.status("--json")
    assert status.returncode == 0, status.stderr
    row = next(s for s in json.loads(status.stdout)["services"] if s["name"] == victim)
    assert (row["restarts"], row["last_exit"], row["health"]) == (1, "SIGKILL", "SERVING")


def test_a_member_that_cannot_stay_up_is_reported_crash_looping_and_heals_once_it_can(
    launcher: Launcher,
) -> None:
    victim = "risk-service"
    host, port = launcher.environ["RISK_SERVICE_ADDR"].rsplit(":", 1)
    thief = socket.socket()  # takes the port the moment the member dies: every start fails
    # As a server binds: the killed member's own connections linger in TIME-WAIT on the port.
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    os.kill(launcher.report()[victim]["pid"], signal.SIGKILL)

    def steal() -> bool:
        try:
            thief.bind((host, int(port)))
        except OSError:
            return False
        thief.listen()
        return True

    _poll(f"the port of {victim} to come free", steal, timeout_s=5)
    try:
        looping = _poll(
            f"{victim} to be reported crash-looping",
            lambda: launcher._alive() and launcher.report()[victim]["crash_looping"],
        )
        assert looping
        status = launcher.status()
        assert launcher.process.poll() is None  # the launcher keeps running
        _others_serving(launcher, but=victim)
    finally:
        thief.close()

    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].endswith(f"1 crash-looping ({victim})")
    assert any(
        line.startswith(f"paymesh: CRASH-LOOPING: {victim} exited (exit 2), 3 exits in a row")
        for line in launcher.err
    ), launcher.output()
    assert "cannot listen" in "".join(launcher.err)  # the member's own log tail says why
    _poll(
        f"{victim} to come back once its port is free", lambda: launcher.health(victim) == "SERVING"
    )
    assert launcher.report()[victim]["restarts"] >= 3
