"""``http.server`` with the admin endpoint's bounds: head, body, time and connections.

The stdlib reads a request line up to 64 KiB, a hundred header lines of 64 KiB each and a body
as slowly as it arrives, on one thread per connection without limit. Here the head is read
line by line against :class:`~services.mesh.admin.HttpLimits` under one deadline, the body under
another, at most ``max_connections`` are served at once (one more gets 503), errors are JSON,
and a refused request's unread rest is drained briefly so the refusal is not lost to a reset.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from services.mesh.admin import HttpLimits, RequestRefused

#: Pending connections the kernel queues before accepting (socketserver's default 5 drops bursts).
LISTEN_BACKLOG = 128


class _ClientGone(Exception):
    """The client closed or fell silent between requests: nothing to answer."""


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """Reads each request within the server's :class:`HttpLimits`; subclasses add ``do_X``."""

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"
    _idle = True
    """No byte of the request being read has arrived yet."""

    def handle_one_request(self) -> None:
        # Set before anything can fail, so an error reply has a status line and a log line.
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
        try:
            if not self._read_head():
                return
            method: Callable[[], None] | None = getattr(self, f"do_{self.command}", None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command}")
                return
            self.connection.settimeout(self.server.limits.write_timeout_s)
            method()
            self.wfile.flush()
        except RequestRefused as refused:
            self.send_error(refused.status, refused.message)
            self._linger()
        except (_ClientGone, TimeoutError, ConnectionError):
            self.close_connection = True

    def _read_head(self) -> bool:
        """Request line and headers within the limits; False when the client is gone or idle."""
        limits = self.server.limits
        deadline = time.monotonic() + limits.head_timeout_s
        try:
            line = self._read_line(deadline, limits.max_request_line_bytes, 414, "request line")
        except RequestRefused as refused:
            if refused.status == 408 and self._idle:
                raise _ClientGone from None  # an idle keep-alive connection, not a slow client
            raise
        head = bytearray()
        count = 0
        while True:
            budget = max(limits.max_header_bytes - len(head), 2)
            raw = self._read_line(deadline, budget, 431, "headers")
            if raw in (b"\r\n", b"\n"):
                break
            count += 1
            if count > limits.max_header_count:
                raise RequestRefused(431, f"more than {limits.max_header_count} header fields")
            head += raw
        self.raw_requestline = line
        # parse_request reads the headers from rfile: give it the bounded copy.
        socket_file, self.rfile = self.rfile, io.BytesIO(bytes(head) + b"\r\n")
        try:
            return self.parse_request()
        finally:
            self.rfile = socket_file

    def _read_line(self, deadline: float, budget: int, status: int, what: str) -> bytes:
        """One line of at most ``budget`` bytes before ``deadline``; never reads past it."""
        line = b""
        self._idle = True
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestRefused(408, "request head not received in time")
            self.connection.settimeout(remaining)
            # The socket's buffered reader (rbufsize -1); peek does at most one receive.
            assert isinstance(self.rfile, io.BufferedReader)
            try:
                chunk = self.rfile.peek(1)
            except TimeoutError:
                raise RequestRefused(408, "request head not received in time") from None
            if not chunk:
                raise _ClientGone
            self._idle = False
            end = chunk.find(b"\n")
            take = len(chunk) if end < 0 else end + 1
            if len(line) + take > budget:
                raise RequestRefused(status, f"{what} longer than the limit")
            line += self.rfile.read(take)
            if end >= 0:
                return line

    def read_body(self) -> bytes:
        """The body ``Content-Length`` announces, within the size and time limits."""
        limits = self.server.limits
        if "Transfer-Encoding" in self.headers:
            raise RequestRefused(411, "send a Content-Length; chunked bodies are not accepted")
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            raise RequestRefused(400, f"bad Content-Length {text[:20]!r}")
        length = int(text)
        if length > limits.max_body_bytes:
            raise RequestRefused(
                413, f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}"
            )
        deadline = time.monotonic() + limits.body_timeout_s
        body = bytearray()
        while len(body) < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestRefused(408, "request body not received in time")
            self.connection.settimeout(remaining)
            try:
                chunk = self.rfile.read1(length - len(body))
            except TimeoutError:
                raise RequestRefused(408, "request body not received in time") from None
            if not chunk:
                raise _ClientGone
            body += chunk
        self.connection.settimeout(limits.write_timeout_s)
        return bytes(body)

    def reply(self, status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``body`` as JSON."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors as JSON like every other answer, and the connection closed."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.reply(int(code), {"error": message or HTTPStatus(code).phrase})

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends, for at most ``linger_s``."""
        deadline = time.monotonic() + self.server.limits.linger_s
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                if not self.connection.recv(64 * 1024):
                    break


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server serving at most ``limits.max_connections`` at once."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BoundedRequestHandler],
        *,
        limits: HttpLimits,
    ) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        body = json.dumps({"error": "too many connections; retry"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(head.encode("latin-1") + body)
        self.shutdown_request(request)
