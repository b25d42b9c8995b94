"""The partner sandbox's fault switches are gated, and every request it reads is bounded.

``/_control/faults`` is off unless fault injection is enabled, and then takes the admin token;
``/_control/stats`` and the partners themselves stay open. The sandbox (aiohttp, the admin
endpoint's :class:`BoundedHttpServer`) holds to its limits: head, headers, body, time and
connections, and queues a burst of connections in its listen backlog. It answers its health
routes as the sandbox, and the launcher counts it ready only when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import http.server
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.mesh.admin import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_REQUEST_LINE_BYTES,
    HttpLimits,
)
from services.mesh.admin_token import (
    ADMIN_TOKEN_FILE_VAR,
    FAULT_INJECTION_VAR,
    ControlAccess,
    admin_authorization,
    with_admin_token,
)
from services.mesh.topology import PARTNER_SANDBOX_VAR
from services.tools.launcher import SANDBOX, Mesh, free_port
from services.tools.sandbox.app import LISTEN_BACKLOG, SANDBOX_LIMITS, Sandbox, SandboxState
from tests.servers import running_sandbox

SHORT = replace(SANDBOX_LIMITS, head_timeout_s=0.5, body_timeout_s=0.5, linger_s=0.5)
FAULT = {"partner": "geo-ip", "error_rate": 1.0, "status": 503}


@contextlib.contextmanager
def _sandbox(
    access: ControlAccess | None = None, limits: HttpLimits = SANDBOX_LIMITS
) -> Iterator[tuple[int, SandboxState]]:
    with running_sandbox(access, limits=limits) as (address, state):
        yield int(address.rsplit(":", 1)[1]), state


@pytest.fixture
def control(tmp_path: Path) -> dict[str, str]:
    """Fault injection on, with an admin token file as the launcher writes it."""
    return with_admin_token({FAULT_INJECTION_VAR: "1"}, tmp_path)


def _request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        connection.close()


def _raw(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``data`` as is; the status and JSON body of the answer, read until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        return _read_answer(sock)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


# -- the control gate ---------------------------------------------------------


def test_fault_switches_are_403_by_default_even_with_the_token(control: dict[str, str]) -> None:
    with _sandbox() as (port, state):
        for method, body in (("POST", FAULT), ("DELETE", None)):
            status, answer = _request(
                port, method, "/_control/faults", body, admin_authorization(control)
            )
            assert (status, answer["reason"]) == (403, "FAULT_INJECTION_DISABLED"), method
        assert state.faults == {}


def test_fault_switch_without_the_token_is_401(control: dict[str, str]) -> None:
    with _sandbox(ControlAccess.from_environ(control)) as (port, state):
        status, answer = _request(port, "POST", "/_control/faults", FAULT)
        assert (status, answer["reason"]) == (401, "CREDENTIALS_MISSING")
        wrong = {"Authorization": "Bearer " + "w" * 43}
        status, answer = _request(port, "POST", "/_control/faults", FAULT, wrong)
        assert (status, answer["reason"]) == (401, "ADMIN_TOKEN_INVALID")
        assert state.faults == {}
        assert _request(port, "GET", "/geo-ip/lookup?ip=192.0.2.1")[0] == 200


def test_fault_switch_with_the_token_makes_the_partner_fail(control: dict[str, str]) -> None:
    with _sandbox(ControlAccess.from_environ(control)) as (port, state):
        token = admin_authorization(control)
        assert _request(port, "POST", "/_control/faults", FAULT, token)[0] == 200
        assert state.faults != {}
        assert _request(port, "GET", "/geo-ip/lookup?ip=192.0.2.1")[0] == 503
        assert _request(port, "DELETE", "/_control/faults", None, token)[0] == 200
        assert state.faults == {}
        assert _request(port, "GET", "/geo-ip/lookup?ip=192.0.2.1")[0] == 200


def test_out_of_range_fault_is_400(control: dict[str, str]) -> None:
    with _sandbox(ControlAccess.from_environ(control)) as (port, state):
        bad = {**FAULT, "delay_ms": 10**9}
        status, _ = _request(port, "POST", "/_control/faults", bad, admin_authorization(control))
        assert status == 400
        assert state.faults == {}


def test_stats_and_partners_need_no_token() -> None:
    with _sandbox() as (port, _):
        assert _request(port, "GET", "/_control/stats")[0] == 200
        assert _request(port, "GET", "/exchange-rate/rates?from=USD&to=EUR")[0] == 200


def test_sandbox_with_fault_injection_but_no_token_file_refuses_to_start() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        FAULT_INJECTION_VAR: "1",
        "PARTNER_SANDBOX_ADDR": "127.0.0.1:0",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "gen")]),
    }
    env.pop(ADMIN_TOKEN_FILE_VAR, None)
    done = subprocess.run(
        [sys.executable, "-m", "services.tools.sandbox"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert ADMIN_TOKEN_FILE_VAR in done.stderr


# -- the bounds ---------------------------------------------------------------


def test_listen_backlog_queues_a_burst_while_nothing_is_accepted() -> None:
    burst = 512  # four times the asyncio default of 128, half the sandbox's backlog
    assert burst < LISTEN_BACKLOG
    sandbox = Sandbox()
    loop = asyncio.new_event_loop()
    port = loop.run_until_complete(sandbox.start("127.0.0.1", 0))
    # The loop stands still: nothing is accepted, so only the kernel's queue can take them.
    clients = [socket.socket() for _ in range(burst)]
    try:
        for client in clients:
            client.setblocking(False)
            assert client.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        assert _connected(clients, deadline_s=10) == burst
    finally:
        for client in clients:
            client.close()
        loop.run_until_complete(sandbox.stop())
        loop.close()


def _connected(clients: list[socket.socket], *, deadline_s: float) -> int:
    """How many of ``clients`` finish connecting (a dropped SYN never does while the queue
    stays full)."""
    poller = select.poll()
    waiting = {client.fileno(): client for client in clients}
    for fd in waiting:
        poller.register(fd, select.POLLOUT)
    done = 0
    end = time.monotonic() + deadline_s
    while waiting and (left := end - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            client = waiting.pop(fd)
            done += client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return done


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    with _sandbox() as (port, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(3):
                connection.request("GET", "/healthz")
                reply = connection.getresponse()
                assert (reply.status, json.loads(reply.read())) == (
                    200,
                    {"status": "ok", "service": SANDBOX},
                )
        finally:
            connection.close()


def test_request_line_over_the_limit_is_414() -> None:
    target = b"/healthz?" + b"a" * MAX_REQUEST_LINE_BYTES
    with _sandbox() as (port, _):
        assert _raw(port, b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)[0] == 414


def test_one_header_field_too_many_is_431() -> None:
    fields = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    with _sandbox() as (port, _):
        assert _raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n%b\r\n" % fields)[0] == 431


def test_headers_over_the_byte_limit_are_431() -> None:
    big = b"X-Big: " + b"b" * (MAX_HEADER_BYTES // 2) + b"\r\n"
    with _sandbox() as (port, _):
        assert _raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n%b%b\r\n" % (big, big))[0] == 431


def test_megabytes_of_headers_are_refused_without_being_held() -> None:
    pad = b"p" * 2000
    with _sandbox(limits=SHORT) as (port, _):
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)

        def flood() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                for i in range(4096):  # about 8 MiB of distinct header fields
                    sock.sendall(b"X-Pad-%d: %b\r\n" % (i, pad))
                sock.sendall(b"\r\n")

        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            flooding = threading.Thread(target=flood, daemon=True)
            flooding.start()
            status, _ = _read_answer(sock)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            sock.close()
            flooding.join(timeout=15)
    assert status == 431
    assert peak - before < 1024 * 1024


def test_body_over_the_limit_is_413_before_it_is_sent() -> None:
    request = b"POST /_control/faults HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (
        MAX_BODY_BYTES + 1
    )
    with _sandbox() as (port, _):
        assert _raw(port, request)[0] == 413


def test_chunked_body_is_411() -> None:
    request = (
        b"POST /bank-transfer/transfers HTTP/1.1\r\nHost: a\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    with _sandbox() as (port, _):
        assert _raw(port, request)[0] == 411


def test_head_trickling_in_is_cut_off_by_the_head_deadline() -> None:
    with _sandbox(limits=SHORT) as (port, _):
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        stop = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                while not stop.wait(0.05):  # each line well within any per-read timeout
                    sock.sendall(b"X-Slow: 1\r\n")

        trickling = threading.Thread(target=trickle, daemon=True)
        trickling.start()
        try:
            status, _ = _read_answer(sock)
        finally:
            stop.set()
            trickling.join()
            sock.close()
    assert status == 408


def test_body_stalling_is_408_after_the_body_deadline() -> None:
    request = (
        b'POST /merchant-webhooks/deliver HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"a"'
    )
    with _sandbox(limits=SHORT) as (port, _):
        assert _raw(port, request)[0] == 408


def test_idle_keep_alive_connection_is_closed_without_an_answer() -> None:
    with _sandbox(limits=SHORT) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            assert sock.recv(1024) == b""


def test_connection_beyond_the_cap_is_503() -> None:
    limits = replace(SANDBOX_LIMITS, max_connections=2)
    with _sandbox(limits=limits) as (port, _):
        held = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(2)]
        try:
            # The held connections are served (they answer), so both slots are taken.
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                assert b"200" in sock.recv(1024)
            status, body = _raw(port, b"")
            assert status == 503
            assert "connections" in body["error"]
        finally:
            for sock in held:
                sock.close()


# -- answering as the sandbox -------------------------------------------------


class _AnswersOkToEverything(http.server.BaseHTTPRequestHandler):
    """A plain HTTP server's handler: 200 ``{"status": "ok"}`` to any GET."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def _plain_http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersOkToEverything)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _launcher_sees_the_sandbox_ready(address: str, var_dir: Path) -> bool:
    environ = {**os.environ, PARTNER_SANDBOX_VAR: address, "PAYMESH_VAR_DIR": str(var_dir)}
    mesh = Mesh(environ=environ, names=(), var_dir=var_dir)
    return mesh.is_ready(SANDBOX)


def test_launcher_counts_the_sandbox_ready_when_it_answers_as_the_sandbox(
    tmp_path: Path,
) -> None:
    with running_sandbox() as (address, _):
        assert _launcher_sees_the_sandbox_ready(address, tmp_path)


def test_launcher_does_not_count_any_http_server_as_the_sandbox(tmp_path: Path) -> None:
    with _plain_http_server() as address:
        assert _request(int(address.rsplit(":", 1)[1]), "GET", "/healthz") == (
            200,
            {"status": "ok"},
        )
        assert not _launcher_sees_the_sandbox_ready(address, tmp_path)
    nobody = f"127.0.0.1:{free_port()}"
    assert not _launcher_sees_the_sandbox_ready(nobody, tmp_path)


def test_each_partner_health_route_answers_as_that_partner_and_is_counted() -> None:
    with _sandbox() as (port, state):
        for partner in ("exchange-rate", "geo-ip", "payment-channel", "bank-transfer"):
            assert _request(port, "GET", f"/{partner}/healthz") == (
                200,
                {"status": "ok", "partner": partner, "service": SANDBOX},
            )
        assert _request(port, "GET", "/no-such-partner/healthz")[0] == 404
        assert state.health_probes == {
            "exchange-rate": 1,
            "geo-ip": 1,
            "payment-channel": 1,
            "bank-transfer": 1,
        }
        assert _request(port, "GET", "/_control/stats")[1]["health_probes"] == state.health_probes


def test_a_failing_partner_fails_its_health_route_too(control: dict[str, str]) -> None:
    with _sandbox(ControlAccess.from_environ(control)) as (port, _):
        token = admin_authorization(control)
        assert _request(port, "POST", "/_control/faults", FAULT, token)[0] == 200
        assert _request(port, "GET", "/geo-ip/healthz")[0] == 503
        assert _request(port, "GET", "/exchange-rate/healthz")[0] == 200


def test_a_slow_partner_does_not_hold_up_the_others(control: dict[str, str]) -> None:
    slow = {"partner": "geo-ip", "delay_ms": 30_000}
    with _sandbox(ControlAccess.from_environ(control)) as (port, _):
        token = admin_authorization(control)
        assert _request(port, "POST", "/_control/faults", slow, token)[0] == 200

        def wait_for_geo_ip() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):  # cut at the stop
                _request(port, "GET", "/geo-ip/lookup?ip=192.0.2.1")

        threading.Thread(target=wait_for_geo_ip, daemon=True).start()
        assert _request(port, "GET", "/exchange-rate/rates?from=USD&to=EUR")[0] == 200
        assert _request(port, "DELETE", "/_control/faults", None, token)[0] == 200


def test_sandbox_process_serves_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        PARTNER_SANDBOX_VAR: address,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "gen")]),
    }
    env.pop(FAULT_INJECTION_VAR, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.tools.sandbox"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert f"PAYMESH_READY service={SANDBOX} address={address}" in ready
        assert _launcher_sees_the_sandbox_ready(address, tmp_path)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 0, rest
        assert "Traceback" not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
