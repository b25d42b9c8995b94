"""A merchant's webhook endpoint for tests, and DNS answers a test chooses.

The receiver records each request exactly as it arrived (path, headers, raw body), so a test
checks the signature the way a merchant would; it can answer failures first, answer late, or
be stopped (its kept connections ended too) and started again on the same port (a partner
down, then back). ``FixedDns`` is notification-service's resolver with fixed answers, counting
lookups (names under ``.test`` exist nowhere else).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class ReceivedWebhook:
    """One request as the merchant's endpoint saw it."""

    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes


@dataclass
class WebhookReceiver:
    """What the endpoint received, and the status it answers."""

    port: int
    status: int = 200
    received: list[ReceivedWebhook] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures_first: int = 0
    """Requests still to answer 503 before ``status`` is answered."""
    delay_s: float = 0.0
    """Wait before answering each request (a slow endpoint)."""
    answered: list[int] = field(default_factory=list)
    """The status of each answer, in order."""

    def url(self, path: str = "/hooks", *, host: str = "127.0.0.1") -> str:
        """The endpoint's URL over plain http with ``host`` as the name."""
        return f"http://{host}:{self.port}{path}"

    def only(self) -> ReceivedWebhook:
        """The one request received so far."""
        with self.lock:
            [webhook] = self.received
        return webhook

    def keys(self) -> Counter[str]:
        """How many requests arrived per Idempotency-Key."""
        with self.lock:
            return Counter(w.headers.get("idempotency-key", "") for w in self.received)

    def accepted_keys(self) -> Counter[str]:
        """How many requests per Idempotency-Key were answered 2xx."""
        with self.lock:
            pairs = zip(self.received, self.answered, strict=True)
            return Counter(w.headers.get("idempotency-key", "") for w, s in pairs if s < 300)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        receiver = self.server.receiver
        if receiver.delay_s:
            time.sleep(receiver.delay_s)
        with receiver.lock:
            receiver.received.append(
                ReceivedWebhook(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            status = receiver.status
            if receiver.failures_first > 0:
                receiver.failures_first -= 1
                status = 503
            receiver.answered.append(status)
        data = b'{"received": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(address, handler)
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """End the kept connections too: a stopped endpoint answers nothing on them."""
        with self.connections_lock:
            for connection in self.open_connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def receiving_webhooks(receiver: WebhookReceiver | None = None) -> Iterator[WebhookReceiver]:
    """A webhook endpoint on 127.0.0.1 in a thread; given ``receiver`` (one stopped before),
    it listens on that one's port again and goes on recording into it."""
    server = _Server(("127.0.0.1", receiver.port if receiver else 0), _Handler)
    server.receiver = receiver or WebhookReceiver(port=server.server_port)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.receiver
    finally:
        server.shutdown()
        server.server_close()
        server.drop_connections()
        thread.join()


class FixedDns:
    """Answers the names it was given, one answer list per lookup in turn (the last repeats)."""

    def __init__(self, answers: Mapping[str, Sequence[Sequence[str]]]) -> None:
        self._answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        turns = self._answers.get(host)
        if not turns:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return turns[min(self.lookups.count(host), len(turns)) - 1]
