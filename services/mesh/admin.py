"""The admin HTTP endpoint of every service: ``/metrics`` for Prometheus, ``/faults`` for chaos.

A few routes on the admin port the topology declares, served from the service's own event
loop with asyncio streams (no extra HTTP dependency). It is for operators and scrapers on
the loopback, not for merchants. Every request is bounded (:class:`HttpLimits`): a request
too long, too slow or one connection too many is answered 414/431/413/408/503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.mesh.admin_token import ControlAccess

log = logging.getLogger("paymesh.admin")

MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
LINGER_S = 2.0
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """Bounds on one HTTP server's requests, so no client can hold memory or connections."""

    max_request_line_bytes: int = MAX_REQUEST_LINE_BYTES
    """Longest request line (method, target, version, CRLF); longer: 414."""
    max_header_count: int = MAX_HEADER_COUNT
    """Most header fields; more: 431."""
    max_header_bytes: int = MAX_HEADER_BYTES
    """Most bytes of all header lines together; more: 431."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Largest ``Content-Length``; larger: 413 before reading it."""
    head_timeout_s: float = HEAD_TIMEOUT_S
    """Time for the whole request line and headers, however slowly they trickle in; then 408."""
    body_timeout_s: float = BODY_TIMEOUT_S
    """Time for the whole body once the head is in; then 408."""
    write_timeout_s: float = WRITE_TIMEOUT_S
    """Time for the answer to be taken by a client that does not read it; then closed."""
    max_connections: int = MAX_CONNECTIONS
    """Connections served at once; one more is answered 503 at once and closed."""
    linger_s: float = LINGER_S
    """After refusing a request, how long its unread rest is read and dropped before closing,
    so the refusal reaches the client instead of a reset."""

    def __post_init__(self) -> None:
        for item in fields(self):
            if getattr(self, item.name) <= 0:
                raise ValueError(f"{item.name} must be > 0, got {getattr(self, item.name)}")


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """One request to the admin endpoint."""

    method: str
    """HTTP method, upper case."""
    path: str
    """Path without the query."""
    query: dict[str, str]
    """Query parameters (last value wins)."""
    body: bytes
    """Request body."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Header fields by lower-case name (last value wins)."""
    peer: str = ""
    """``host:port`` of the client, for logs."""

    def json(self) -> Any:
        """The body decoded as JSON (``None`` when empty); ValueError when it is not JSON."""
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """What a route answers."""

    status: int
    """HTTP status."""
    body: bytes
    """Body bytes."""
    content_type: str = "application/json"
    """Content type of the body."""
    headers: tuple[tuple[str, str], ...] = ()
    """Further header fields."""

    @classmethod
    def of_json(
        cls, value: Any, status: int = 200, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> AdminResponse:
        """A JSON answer."""
        body = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
        return cls(status, body, headers=headers)


Route = Callable[[AdminRequest], Awaitable[AdminResponse] | AdminResponse]


class RequestRefused(Exception):
    """The request breaks the HTTP rules or a limit; answered with ``status`` and closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> AdminResponse:
        """The JSON answer."""
        return AdminResponse.of_json({"error": self.message}, self.status)


def guarded(access: ControlAccess, handler: Route) -> Route:
    """``handler`` behind the control gate: 403 when fault injection is off, 401 without the
    admin token; the refusal is logged without the header."""

    async def route(request: AdminRequest) -> AdminResponse:
        refusal = access.refusal(request.headers.get("authorization"))
        if refusal is not None:
            log.warning(
                "refused %s %s from %s: %s",
                request.method,
                request.path,
                request.peer or "?",
                refusal.reason,
            )
            return AdminResponse.of_json(refusal.as_json(), refusal.status, headers=refusal.headers)
        result = handler(request)
        return await result if isinstance(result, Awaitable) else result

    return route


class AdminServer:
    """A tiny bounded HTTP/1.1 server with exact-path routes; one request per connection."""

    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.limits = limits or HttpLimits()
        self._routes: dict[tuple[str, str], Route] = {}
        self._server: asyncio.Server | None = None
        self._serving: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._refusing: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def route(self, method: str, path: str, handler: Route) -> None:
        """Serve ``method path`` with ``handler``."""
        self._routes[(method.upper(), path)] = handler

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        limits = self.limits
        self._server = await asyncio.start_server(
            self._handle,
            host.strip("[]"),
            port,
            # The reader's buffer (about twice this) is all one connection may hold unread.
            limit=max(limits.max_request_line_bytes, limits.max_header_bytes) + 2,
            backlog=128,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and end open connections."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Closing the transports ends every read at once (cancelling the handler tasks instead
        # makes Python 3.11's stream protocol log an error for each).
        connections = {**self._serving, **self._refusing}
        for writer in connections.values():
            writer.close()
        await asyncio.gather(*connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        cap = self.limits.max_connections
        if len(self._serving) >= cap:
            busy = AdminResponse.of_json({"error": "too many admin connections; retry"}, 503)
            await self._send(writer, busy)
            if len(self._refusing) < cap:  # beyond that, a reset is answer enough
                self._refusing[task] = writer
                try:
                    await self._linger(reader, writer)
                finally:
                    del self._refusing[task]
            writer.close()
            return
        self._serving[task] = writer
        try:
            await self._serve(reader, writer)
        finally:
            del self._serving[task]
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read(reader, writer)
        except RequestRefused as refused:
            await self._send(writer, refused.response())
            await self._linger(reader, writer)
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away mid-request: nobody to answer
        await self._send(writer, await self._dispatch(request))

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> AdminRequest:
        limits = self.limits
        try:
            async with asyncio.timeout(limits.head_timeout_s):
                method, target, headers = await self._read_head(reader)
        except TimeoutError:
            message = f"request head not received in {limits.head_timeout_s:g} s"
            raise RequestRefused(408, message) from None
        length = _content_length(headers, limits.max_body_bytes)
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                body = await reader.readexactly(length) if length else b""
        except TimeoutError:
            message = f"request body not received in {limits.body_timeout_s:g} s"
            raise RequestRefused(408, message) from None
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        peer = writer.get_extra_info("peername")
        return AdminRequest(
            method,
            url.path,
            query,
            body,
            headers,
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
        )

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        limits = self.limits
        line = await _read_line(reader, limits.max_request_line_bytes, 414, "request line")
        words = line.decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise RequestRefused(400, "malformed request line")
        headers: dict[str, str] = {}
        count = size = 0
        while True:
            # The blank line that ends the head always fits; a field must fit what is left.
            budget = max(limits.max_header_bytes - size, 2)
            raw = await _read_line(reader, budget, 431, "headers")
            if raw in (b"\r\n", b"\n"):
                return words[0].upper(), words[1], headers
            count, size = count + 1, size + len(raw)
            if count > limits.max_header_count:
                raise RequestRefused(431, f"more than {limits.max_header_count} header fields")
            name, colon, value = raw.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise RequestRefused(400, "malformed header field")
            headers[name.lower()] = value.strip()

    async def _dispatch(self, request: AdminRequest) -> AdminResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            allowed = [m for m, p in self._routes if p == request.path]
            if allowed:
                return AdminResponse.of_json({"error": f"use {', '.join(allowed)}"}, 405)
            return AdminResponse.of_json({"error": f"no route {request.path}"}, 404)
        try:
            result = handler(request)
            return await result if isinstance(result, Awaitable) else result
        except ValueError as exc:
            return AdminResponse.of_json({"error": str(exc)}, 400)
        except Exception:
            log.exception("admin route %s %s failed", request.method, request.path)
            return AdminResponse.of_json({"error": "internal error; see the service log"}, 500)

    async def _send(self, writer: asyncio.StreamWriter, response: AdminResponse) -> None:
        try:
            phrase = HTTPStatus(response.status).phrase
        except ValueError:
            phrase = "Status"
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        head = (
            f"HTTP/1.1 {response.status} {phrase}\r\n"
            f"Content-Type: {response.content_type}\r\n{extra}"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(head.encode("latin-1") + response.body)
            async with asyncio.timeout(self.limits.write_timeout_s):
                await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drop what the client still sends, for at most ``linger_s``.

        Closing with unread input makes the kernel send a reset, which can destroy the answer
        before the client reads it.
        """
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(self.limits.linger_s):
                while await reader.read(_READ_CHUNK):
                    pass


async def _read_line(reader: asyncio.StreamReader, budget: int, status: int, what: str) -> bytes:
    """One line of at most ``budget`` bytes, else ``status``; IncompleteReadError at EOF."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        line = b""  # longer than the reader's limit, so longer than any budget
    if not line or len(line) > budget:
        raise RequestRefused(status, f"{what} longer than the limit")
    return line


def _content_length(headers: Mapping[str, str], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise RequestRefused(411, "send a Content-Length; chunked bodies are not accepted")
    text = headers.get("content-length", "0").strip() or "0"
    if not text.isdigit():
        raise RequestRefused(400, f"bad Content-Length {text[:20]!r}")
    length = int(text)
    if length > limit:
        raise RequestRefused(413, f"body of {length} bytes exceeds the limit of {limit}")
    return length
