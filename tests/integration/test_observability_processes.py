"""A downstream process stops: the caller's Diagnostics (DEGRADED), ``services.tools.status`` (its
summary line, exit status 0) and a real Prometheus server scraping the admin ports all show that
edge down with its breaker open, while the caller's own liveness stays SERVING; every query of
the Grafana dashboard returns series from that Prometheus.

merchant-auth-service calls merchant-service on every IssueApiKey; the policy file gives that
edge a short timeout and a small breaker window so it opens after a few failed calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh.pki import OPERATOR, ensure_dev_pki
from services.mesh.tls import operator_security
from services.mesh.topology import Topology
from services.tools.grafana_dashboard import PANELS
from services.tools.launcher import Mesh, ephemeral_environ, free_port
from services.tools.ports import PICK_RANGE, can_bind
from services.tools.prometheus_config import render
from tests.integration.harness import poll_until as _poll

pytestmark = pytest.mark.slow

CALLER, DOWNSTREAM = "merchant-auth-service", "merchant-service"
POLICY = f"""
[targets."{DOWNSTREAM}"]
timeout_s = 0.5

[targets."{DOWNSTREAM}".retry]
max_attempts = 2
initial_backoff_s = 0.01

# One retry per minute: the second failing call's retry is refused, so the budget series exists.
[targets."{DOWNSTREAM}".budget]
retry_ratio = 0.0
min_retries = 1
window_s = 60.0

[targets."{DOWNSTREAM}".breaker]
minimum_calls = 3
failure_rate = 0.5
window_s = 60.0
open_s = 300.0
half_open_calls = 1
"""


#: What a call through the caller ends with while its dependency is down.
FAILED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


#: The environment of the module's mesh, so probes present its operator certificate.
_MESH_ENV: dict[str, str] = {}


def _channel(address: str) -> grpc.Channel:
    """An mTLS channel to the caller service as the operator (the only one granted Diagnostics)."""
    return operator_security(_MESH_ENV).sync_channel(CALLER, address)


def _diagnostics(address: str) -> mesh_pb2.GetDiagnosticsResponse:
    with _channel(address) as channel:
        stub = mesh_pb2_grpc.DiagnosticsServiceStub(channel)
        return stub.GetDiagnostics(mesh_pb2.GetDiagnosticsRequest(), timeout=5)


def _edge(address: str) -> mesh_pb2.Dependency:
    return next(d for d in _diagnostics(address).dependencies if d.name == DOWNSTREAM)


def _liveness(address: str) -> int:
    with _channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def _status(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m services.tools.status *args`` in ``environ``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "services.tools.status", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass(frozen=True, slots=True)
class Prometheus:
    """A Prometheus server the test started."""

    url: str
    """Base URL of its HTTP API."""

    def query(self, promql: str) -> dict[str, Any]:
        """An instant query; the decoded API answer."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer: dict[str, Any] = json.loads(reply.read())
        return answer


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    var_dir = tmp_path_factory.mktemp("observed-mesh")
    policy = var_dir / "policy.toml"
    policy.write_text(POLICY)
    environ = ephemeral_environ()
    environ["PAYMESH_POLICY_FILE"] = str(policy)
    running = Mesh(environ=environ, names=(CALLER, DOWNSTREAM), var_dir=var_dir, with_sandbox=False)
    running.start(timeout_s=60)
    _MESH_ENV.clear()
    _MESH_ENV.update(running.environ)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def prometheus(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian: apt-get install prometheus; "
            ".ci/run installs it)"
        )
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(render(Topology(environ=mesh.environ), interval_s=1))
    address = f"127.0.0.1:{free_port()}"
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    server = Prometheus(f"http://{address}")

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}; see {workdir}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as reply:
                return bool(reply.status == 200)
        return False

    try:
        _poll("prometheus to be ready", ready)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _issue_api_key(address: str, *, timeout_s: float) -> grpc.RpcError | None:
    """One IssueApiKey through the caller (so one GetMerchant on the edge); its error, if any."""
    with _channel(address) as channel:
        stub = merchant_auth_pb2_grpc.MerchantAuthServiceStub(channel)
        request = merchant_auth_pb2.IssueApiKeyRequest(
            request_id=str(uuid.uuid4()), merchant_id="m_1", label="observability"
        )
        try:
            stub.IssueApiKey(request, timeout=timeout_s)
        except grpc.RpcError as error:
            return error
    return None


#: Calls on the edge that merchant-service answered before it stopped (see healthy_traffic).
ANSWERED = 4


def _failed_bps(recent_calls: int) -> int:
    """Error rate of the edge's window in basis points: every call but ``ANSWERED`` failed."""
    return round(10_000 * (recent_calls - ANSWERED) / recent_calls)


@pytest.fixture(scope="module")
def healthy_traffic(mesh: Mesh) -> None:
    """Calls on the edge while the downstream runs, with the deadlines the dashboard shows.

    m_1 is unknown to merchant-service, so the calls end NOT_FOUND: an answer, not a failure.
    """
    caller = mesh.topology.address(CALLER)
    for _ in range(ANSWERED - 1):
        error = _issue_api_key(caller, timeout_s=5)
        assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND
    # 0.3 s left is less than the edge's 0.5 s timeout: the outgoing deadline is cut to it.
    error = _issue_api_key(caller, timeout_s=0.3)
    assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND
    # 20 ms left is less than the 50 ms deadline margin: the outgoing call is never sent.
    error = _issue_api_key(caller, timeout_s=0.02)
    assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def outage(mesh: Mesh, healthy_traffic: None) -> str:
    """Stop the downstream, fail calls through the caller until its breaker opens, then make
    one more call that the open breaker refuses.

    Returns the caller's address.
    """
    caller = mesh.topology.address(CALLER)
    process = mesh.members[DOWNSTREAM].process
    assert process is not None
    mesh.signal(DOWNSTREAM, signal.SIGTERM)
    process.wait(timeout=15)

    def call_fails_until_open() -> bool:
        with _channel(caller) as channel:
            stub = merchant_auth_pb2_grpc.MerchantAuthServiceStub(channel)
            request = merchant_auth_pb2.IssueApiKeyRequest(
                request_id=str(uuid.uuid4()), merchant_id="m_1", label="observability"
            )
            with pytest.raises(grpc.RpcError) as failure:
                stub.IssueApiKey(request, timeout=5)
        assert isinstance(failure.value, grpc.Call)
        assert failure.value.code() in FAILED
        return _edge(caller).breaker_state == mesh_pb2.BREAKER_STATE_OPEN

    _poll(f"the breaker {CALLER} -> {DOWNSTREAM} to open", call_fails_until_open, every_s=0)
    refused = _issue_api_key(caller, timeout_s=5)
    assert isinstance(refused, grpc.Call) and refused.code() == grpc.StatusCode.UNAVAILABLE
    return caller


def test_prometheus_query_returns_the_open_breaker_of_the_stopped_edge(
    prometheus: Prometheus, outage: str
) -> None:
    selector = f'paymesh_breaker_state{{caller="{CALLER}",target="{DOWNSTREAM}"}}'

    def open_state() -> list[Any]:
        result: list[Any] = prometheus.query(f"{selector} == 2")["data"]["result"]
        return result

    result = _poll("Prometheus to scrape the open breaker", open_state)

    assert result[0]["metric"]["service"] == CALLER
    assert result[0]["value"][1] == "2"
    transitions = prometheus.query(
        f'paymesh_breaker_transitions_total{{caller="{CALLER}",to_state="open"}}'
    )["data"]["result"]
    assert transitions and float(transitions[0]["value"][1]) >= 1


#: Dashboard series this module's mesh cannot fill, each with the condition it needs and the test
#: that creates it. Their panels' queries must still be valid and, here, empty: when one starts
#: returning data this list is wrong and the test says so.
EMPTY_HERE = {
    "paymesh_breaker_aborted_calls_total": "calls in flight when the breaker opens; the stopped "
    "downstream refuses connections at once, so none waits (tests/unit/test_breaker_metrics.py)",
    "paymesh_client_concurrency_limited_total": "100 attempts in flight to one target "
    "(tests/unit/test_breaker_metrics.py)",
    "paymesh_client_tls_handshake_failures_total": "a target with an untrusted or expired "
    "certificate; the mesh's own are valid (tests/integration/test_chain_tls.py)",
    "paymesh_server_shed_total": "a service at its concurrency cap "
    "(tests/integration/test_merchant_auth_limits.py)",
}


def _answer(prometheus: Prometheus, expr: str) -> list[Any]:
    answer = prometheus.query(expr.replace("$caller", ".*"))
    assert answer["status"] == "success", (expr, answer)
    result: list[Any] = answer["data"]["result"]
    return result


def test_every_dashboard_query_returns_series_from_the_mesh(
    prometheus: Prometheus, outage: str
) -> None:
    queries = [(panel.title, query.expr) for panel in PANELS for query in panel.queries]
    expected_empty = [(t, e) for t, e in queries if any(s in e for s in EMPTY_HERE)]
    expected_full = [q for q in queries if q not in expected_empty]
    # rate() needs two scrapes of a series inside its window; Prometheus scrapes every second.
    deadline = time.monotonic() + 60
    while empty := [(t, e) for t, e in expected_full if not _answer(prometheus, e)]:
        if time.monotonic() > deadline:
            pytest.fail(f"dashboard queries still empty after 60s: {empty}")
        time.sleep(0.5)  # waiting for the next scrape, bounded by the deadline

    assert len(expected_empty) == len(EMPTY_HERE)  # one panel each, none of them missed
    for title, expr in expected_empty:
        assert _answer(prometheus, expr) == [], f"{title!r} has data now: update EMPTY_HERE"
    budget = _answer(prometheus, "sum(paymesh_retry_budget_exhausted_total)")
    assert float(budget[0]["value"][1]) >= 1  # the stat's `or vector(0)` did not answer alone


def test_diagnostics_shows_the_stopped_dependency_down_and_its_breaker_open(
    outage: str,
) -> None:
    edge = _edge(outage)

    assert edge.kind == mesh_pb2.DEPENDENCY_KIND_GRPC_SERVICE
    assert edge.health == mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE
    assert edge.breaker_state == mesh_pb2.BREAKER_STATE_OPEN
    assert edge.recent_call_count >= ANSWERED + 2
    assert edge.error_rate_bps == _failed_bps(edge.recent_call_count)
    assert edge.last_error_code in {code.name for code in FAILED}
    assert edge.last_error and edge.HasField("last_error_time")
    assert _liveness(outage) == health_pb2.HealthCheckResponse.SERVING
    report = _diagnostics(outage)
    assert report.status == mesh_pb2.SERVICE_STATUS_DEGRADED
    assert f"{DOWNSTREAM}: UNREACHABLE, breaker OPEN" in report.status_reason


def test_status_json_shows_the_stopped_dependency_down_and_its_breaker_open(
    mesh: Mesh, outage: str
) -> None:
    run = _status(mesh.environ, "--json")

    assert run.returncode == 0, run.stderr  # it could report: what it found is in the report
    answer = json.loads(run.stdout)
    assert answer["summary"] == {
        "services": 11,
        "serving": 1,  # only the caller runs: the downstream is stopped, the rest never ran
        "open_breakers": [f"{CALLER} -> {DOWNSTREAM}"],
        "crash_looping": [],
        "launcher": "none",  # a test's Mesh, not make run: nobody reports restarts
    }
    services = {s["name"]: s for s in answer["services"]}
    assert services[DOWNSTREAM]["health"] == "DOWN"
    caller = services[CALLER]
    assert (caller["health"], caller["liveness"]) == ("SERVING", "SERVING")
    assert caller["overall"] == "DEGRADED"
    assert caller["restarts"] is None
    edge = next(e for e in caller["edges"] if e["name"] == DOWNSTREAM)
    assert edge["health"] == "UNREACHABLE"
    assert edge["breaker"] == "OPEN"
    assert edge["error_rate"] == _failed_bps(edge["recent_calls"]) / 10_000


def test_status_table_names_the_open_edge(mesh: Mesh, outage: str) -> None:
    run = _status(mesh.environ)

    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stderr
    assert lines[0].endswith(
        f": 1/11 serving, 1 open breaker ({CALLER} -> {DOWNSTREAM}), 0 crash-looping"
    )
    assert lines[1].startswith("restarts: unknown, no launcher.json")
    index, line = next(
        (i, row) for i, row in enumerate(lines) if row.startswith(f"  -> {DOWNSTREAM} ")
    )
    assert "UNREACHABLE" in line and "OPEN" in line
    assert lines[index + 1].lstrip().startswith("last error at ")  # with its time, under it
    assert max(len(row) for row in lines) <= 120
    assert "Traceback" not in run.stderr


def test_status_exits_zero_and_says_so_when_nothing_answers(tmp_path: Path) -> None:
    nobody = ephemeral_environ()  # every address free: the whole mesh is DOWN
    nobody["PAYMESH_VAR_DIR"] = str(tmp_path)
    ensure_dev_pki(tmp_path / "pki", [OPERATOR])

    run = _status(nobody)

    assert run.returncode == 0, run.stderr
    first, *rest = run.stdout.splitlines()
    assert first.startswith("paymesh status at ")
    assert first.endswith(": 0/11 serving, 0 open breakers, 0 crash-looping")
    assert sum(" DOWN " in f"{row} " for row in rest) == 11


def test_status_exits_nonzero_only_when_it_cannot_report(tmp_path: Path) -> None:
    broken = ephemeral_environ()
    broken["ORDER_SERVICE_ADDR"] = "not-an-address"

    run = _status(broken)

    assert run.returncode == 2
    assert "ORDER_SERVICE_ADDR" in run.stderr


def test_status_watch_refreshes_until_ctrl_c_and_exits_cleanly(tmp_path: Path) -> None:
    nobody = ephemeral_environ()  # every address free: the whole mesh is DOWN
    nobody["PAYMESH_VAR_DIR"] = str(tmp_path)
    ensure_dev_pki(tmp_path / "pki", [OPERATOR])
    watch = subprocess.Popen(
        [sys.executable, "-m", "services.tools.status", "--watch", "0.1"],
        env=nobody,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    try:
        refreshes = 0
        while refreshes < 2:
            line = watch.stdout.readline()
            assert line, "status --watch stopped by itself"
            refreshes += line.startswith("paymesh status at")
            if line.startswith("merchant-service"):
                assert "DOWN" in line
        watch.send_signal(signal.SIGINT)
        _, stderr = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()

    assert watch.returncode == 0
    assert "Traceback" not in stderr


def _offset_with_free_ports(name: str) -> int:
    """A ``PAYMESH_PORT_OFFSET`` that puts ``name``'s default mesh and admin ports on free ports."""
    spec = Topology(environ={}).service(name)
    for _ in range(50):
        offset = free_port() - spec.port
        admin = spec.admin_port + offset
        if admin <= PICK_RANGE[1] and can_bind("127.0.0.1", admin):
            return offset
    pytest.fail(f"no port offset with free ports for {name}")


def test_status_finds_a_service_started_with_only_a_port_offset(tmp_path: Path) -> None:
    name = "order-service"  # calls nothing: it serves alone
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_ADDR", "_PARTNER_URL"))}
    offset = _offset_with_free_ports(name)
    environ["PAYMESH_PORT_OFFSET"] = str(offset)
    started = Mesh(environ=environ, names=(name,), var_dir=tmp_path, with_sandbox=False)
    started.start(timeout_s=60)
    try:
        run = _status(started.environ, "--json")
    finally:
        started.stop()

    assert run.returncode == 0, run.stderr
    services = {s["name"]: s for s in json.loads(run.stdout)["services"]}
    # Every address status asked is the declared port shifted; only ours is known to answer
    # (another test's server may happen to listen on one of the others).
    assert {n: s["address"] for n, s in services.items()} == {
        spec.name: f"127.0.0.1:{spec.port + offset}" for spec in Topology(environ={}).services
    }
    assert services[name]["health"] == "SERVING"


def test_a_service_logs_one_json_object_per_line_with_the_access_fields(tmp_path: Path) -> None:
    name = "order-service"
    environ = ephemeral_environ()
    environ["PAYMESH_LOG_FORMAT"] = "json"
    started = Mesh(environ=environ, names=(name,), var_dir=tmp_path, with_sandbox=False)
    started.start(timeout_s=60)
    try:
        security = operator_security(started.environ)
        with security.sync_channel(name, started.topology.address(name)) as channel:
            with pytest.raises(grpc.RpcError) as missing:
                order_pb2_grpc.OrderServiceStub(channel).GetOrder(
                    order_pb2.GetOrderRequest(order_id="ord_missing"), timeout=5
                )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        started.stop()

    text = started.members[name].log_path.read_text()
    # stdout shares the file: the ready marker is for the launcher, not a log record.
    records = [json.loads(line) for line in text.splitlines() if not line.startswith("PAYMESH_")]
    assert records and all(r["service"] == name for r in records)
    (access,) = [r for r in records if r["logger"] == "paymesh.access"]
    assert access["method"] == "/paymesh.order.v1.OrderService/GetOrder"
    assert access["code"] == "NOT_FOUND"
    assert access["duration_ms"] >= 0
    assert len(access["trace_id"] or "") == 32  # the call's trace
