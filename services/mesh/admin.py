"""The admin HTTP endpoint of every service: ``/metrics`` for Prometheus, ``/faults`` for chaos.

A few exact-path routes on the admin port the topology declares, served by aiohttp from the
service's own event loop; for operators and scrapers on the loopback, not for merchants.
:class:`BoundedHttpServer` (also the partner sandbox's server) holds every request to
:class:`HttpLimits`: too long, too slow or one connection too many is answered
414/431/413/411/408/503 in JSON and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from multidict import CIMultiDict

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
#: Pending connections the kernel queues before they are accepted.
LISTEN_BACKLOG = 128
#: On stop, how long a request in flight may finish before its connection is cut.
STOP_GRACE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """Bounds on one HTTP server's requests, so no client can hold memory or connections."""

    max_request_line_bytes: int = MAX_REQUEST_LINE_BYTES
    """Longest request target (path and query; aiohttp ``max_line_size``); longer: 414."""
    max_header_count: int = MAX_HEADER_COUNT
    """Most header fields (aiohttp ``max_headers``); more: 431."""
    max_header_bytes: int = MAX_HEADER_BYTES
    """Most bytes of all header fields together, and so of any one (aiohttp
    ``max_field_size``); more: 431."""
    max_body_bytes: int = MAX_BODY_BYTES
    """Largest ``Content-Length`` (aiohttp ``client_max_size``); larger: 413 before reading it."""
    head_timeout_s: float = HEAD_TIMEOUT_S
    """Time for the whole request line and headers from the connection's start (or the end of
    the previous answer), however slowly they trickle in; then 408, or a silent close when not
    a byte came (an idle keep-alive connection)."""
    body_timeout_s: float = BODY_TIMEOUT_S
    """Time for the whole body once the head is in; then 408."""
    write_timeout_s: float = WRITE_TIMEOUT_S
    """Time for the answer to be taken by a client that does not read it; then cut."""
    max_connections: int = MAX_CONNECTIONS
    """Connections served at once; one more is answered 503 at once and closed."""
    linger_s: float = LINGER_S
    """After the server closes a connection, how long the client's unread rest is read and
    dropped, so the last answer (a refusal) reaches it instead of a reset."""

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
    """The request breaks a limit; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        """The JSON answer, closing the connection."""
        return json_error(self.status, self.message, close=True)


def json_error(status: int, message: str, *, close: bool = False) -> web.Response:
    """``{"error": message}`` with ``status``; ``close`` ends the connection after it."""
    response = web.json_response({"error": message}, status=status)
    if close:
        response.force_close()
    return response


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
    """The admin endpoint: exact-path routes on a :class:`BoundedHttpServer`."""

    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.limits = limits or HttpLimits()
        self._routes: dict[tuple[str, str], Route] = {}
        self._http: BoundedHttpServer | None = None

    def route(self, method: str, path: str, handler: Route) -> None:
        """Serve ``method path`` with ``handler`` (routes are fixed once started)."""
        self._routes[(method.upper(), path)] = handler

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        app = bounded_app(self.limits)
        for (method, path), handler in self._routes.items():
            app.router.add_route(method, path, _serve_route(handler))
        self._http = BoundedHttpServer(app, self.limits)
        return await self._http.start(host, port)

    async def stop(self) -> None:
        """Stop listening and end open connections."""
        http, self._http = self._http, None
        if http is not None:
            await http.stop()


def _serve_route(handler: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        admin_request = AdminRequest(
            request.method,
            request.path,
            {k: v for k, v in request.query.items() if v},  # last wins, blanks dropped
            await request.read(),
            {k.lower(): v for k, v in request.headers.items()},
            peer_of(request),
        )
        try:
            result = handler(admin_request)
            answer = await result if isinstance(result, Awaitable) else result
        except ValueError as exc:
            return json_error(400, str(exc))
        except Exception:
            log.exception("admin route %s %s failed", request.method, request.path)
            return json_error(500, "internal error; see the service log")
        headers = CIMultiDict([("Content-Type", answer.content_type), *answer.headers])
        return web.Response(status=answer.status, body=answer.body, headers=headers)

    return serve


def peer_of(request: web.BaseRequest) -> str:
    """``host:port`` of the client, for logs."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""


# -- the bounded server -------------------------------------------------------


def bounded_app(limits: HttpLimits) -> web.Application:
    """An aiohttp application whose every request is checked against ``limits`` (head size,
    body size and time, answer time) and whose every error is JSON; add routes to it."""

    @web.middleware
    async def within_limits(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if isinstance(request.protocol, _BoundedProtocol):
            request.protocol.head_received()
        try:
            _check_head(request, limits)
            try:
                async with asyncio.timeout(limits.body_timeout_s):
                    await request.read()  # kept by aiohttp; a handler's read() gets it again
            except TimeoutError:
                message = f"request body not received in {limits.body_timeout_s:g} s"
                raise RequestRefused(408, message) from None
            response = await handler(request)
        except RequestRefused as refused:
            response = refused.response()
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
            response = _http_error(request, exc)
        try:
            async with asyncio.timeout(limits.write_timeout_s):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            log.warning(
                "cut %s: the answer was not taken in %gs",
                peer_of(request) or "?",
                limits.write_timeout_s,
            )
            if request.transport is not None:
                request.transport.abort()
        return response

    return web.Application(client_max_size=limits.max_body_bytes, middlewares=[within_limits])


def _check_head(request: web.BaseRequest, limits: HttpLimits) -> None:
    """The limits aiohttp's parser does not apply itself: the exact field count, their bytes
    together, and the body size announced before it is read."""
    if len(request.raw_headers) > limits.max_header_count:
        raise RequestRefused(431, f"more than {limits.max_header_count} header fields")
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)  # ": ", CRLF
    if size > limits.max_header_bytes:
        raise RequestRefused(
            431, f"headers of {size} bytes exceed the limit of {limits.max_header_bytes}"
        )
    if "Transfer-Encoding" in request.headers:
        raise RequestRefused(411, "send a Content-Length; chunked bodies are not accepted")
    length = request.content_length or 0
    if length > limits.max_body_bytes:
        raise RequestRefused(
            413, f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}"
        )


def _http_error(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return json_error(405, f"use {', '.join(sorted(exc.allowed_methods))}")
    if isinstance(exc, web.HTTPNotFound):
        return json_error(404, f"no route {request.path}")
    return json_error(exc.status, exc.reason, close=exc.status >= 400)


class BoundedHttpServer:
    """An aiohttp application served within :class:`HttpLimits`.

    aiohttp parses and answers; what it has no option for is added here, on its documented
    seams: a connection cap (one more is answered 503 before aiohttp sees it), the head
    deadline and JSON answers for the parser's refusals (a :class:`web.RequestHandler`), and a
    lingering close so a refusal is read before the connection goes.
    """

    def __init__(
        self, app: web.Application, limits: HttpLimits, *, backlog: int = LISTEN_BACKLOG
    ) -> None:
        self.app = app
        self.limits = limits
        self.backlog = backlog
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_GRACE_S)
        self._listener: asyncio.Server | None = None
        # Weak, so a connection that never reaches connection_made cannot hold a slot.
        self._serving: weakref.WeakSet[_BoundedProtocol] = weakref.WeakSet()
        self._refusing: weakref.WeakSet[_Busy] = weakref.WeakSet()
        self.stopping = False
        """Set by :meth:`stop`: connections close at once, without lingering."""

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                self._protocol, host.strip("[]"), port, backlog=self.backlog
            )
        except OSError:
            await self._runner.cleanup()
            raise
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish briefly, end every connection."""
        self.stopping = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        await self._runner.cleanup()
        for busy in list(self._refusing):
            busy.abort()
        if listener is not None:
            await listener.wait_closed()

    def _protocol(self) -> asyncio.BaseProtocol:
        """One protocol per accepted connection: served, refused with 503, or reset."""
        limits = self.limits
        if len(self._serving) >= limits.max_connections:
            busy = _Busy(self, refuse=len(self._refusing) < limits.max_connections)
            self._refusing.add(busy)
            return busy
        server = self._runner.server
        assert server is not None, "start() sets the runner up first"
        protocol = _BoundedProtocol(
            server,
            loop=asyncio.get_running_loop(),
            owner=self,
            access_log=None,
            logger=log,
            max_line_size=limits.max_request_line_bytes,
            # One over, so the exact count is checked (and named) with the request in hand.
            max_headers=limits.max_header_count + 1,
            max_field_size=limits.max_header_bytes,
            # The head deadline closes idle connections; aiohttp's own timer only backs it up.
            keepalive_timeout=2 * limits.head_timeout_s,
            lingering_time=0,  # an unread body ends keep-alive; _LingeringTransport drains
        )
        self._serving.add(protocol)
        return protocol

    def release(self, protocol: _BoundedProtocol | _Busy) -> None:
        """A connection is gone: its slot is free."""
        if isinstance(protocol, _Busy):
            self._refusing.discard(protocol)
        else:
            self._serving.discard(protocol)


def refusal_bytes(status: int, message: str) -> bytes:
    """A whole JSON error answer, for the two moments no aiohttp response exists: a connection
    over the cap, and a head that missed its deadline."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_HEAD_END = b"\r\n\r\n"
#: What a request line holds besides its target: method, two spaces, version, CRLF.
_REQUEST_LINE_FRAME = 64


class _LingeringTransport:
    """The connection's transport, closing as a polite server does: half-close, drop what the
    client still sends for ``linger_s``, then close (closing with unread input makes the kernel
    send a reset, which can destroy the answer before the client reads it)."""

    def __init__(self, transport: asyncio.Transport, owner: BoundedHttpServer) -> None:
        self._transport = transport
        self._owner = owner
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if self._owner.stopping or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        # abort, not close: what a client never reads must not keep the connection.
        self._timer = asyncio.get_running_loop().call_later(
            self._owner.limits.linger_s, transport.abort
        )

    def abort(self) -> None:
        self._closing = True
        self.cancel_linger()
        self._transport.abort()

    def cancel_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _BoundedProtocol(web.RequestHandler):
    """aiohttp's connection handler with the head deadline, a lingering close and JSON for
    the parser's refusals."""

    def __init__(self, manager: web.Server, *, owner: BoundedHttpServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._owner = owner
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head_bytes = 0
        """Bytes of the awaited head received so far, up to its blank line."""
        self._head_tail = b""
        """The last bytes received of it, to find a blank line split between two reads."""
        self._head_line_bytes = 0
        """Length of its request line once it has ended, else 0: which limit a head too long
        broke (414 or 431)."""
        self._lingering: _LingeringTransport | None = None
        limits = owner.limits
        # Request line (target and its frame), fields, the blank line.
        self._max_head_bytes = (
            limits.max_request_line_bytes + _REQUEST_LINE_FRAME + limits.max_header_bytes + 2
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lingering = _LingeringTransport(cast(asyncio.Transport, transport), self._owner)
        super().connection_made(cast(asyncio.Transport, self._lingering))
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering is None or self._lingering.is_closing():
            return  # closing: the rest is dropped
        if self._awaiting_head and self._head_tail != _HEAD_END and not self._count_head(data):
            return
        super().data_received(data)

    def _count_head(self, data: bytes) -> bool:
        """Count the head's bytes before aiohttp holds them; False when it is refused.

        aiohttp bounds each field and their number, not the head as a whole: this keeps what
        one connection makes the parser hold to the request line and header limits.
        """
        if not self._head_line_bytes and (newline := data.find(b"\n")) >= 0:
            self._head_line_bytes = self._head_bytes + newline + 1
        seen = self._head_tail + data
        end = seen.find(_HEAD_END)
        if end < 0:
            self._head_bytes += len(data)
            self._head_tail = seen[-len(_HEAD_END) + 1 :]
        else:
            self._head_bytes += end + len(_HEAD_END) - len(self._head_tail)
            self._head_tail = _HEAD_END  # the head is complete: nothing more to count
        if self._head_bytes <= self._max_head_bytes:
            return True
        line_limit = self._owner.limits.max_request_line_bytes + _REQUEST_LINE_FRAME
        if 0 < self._head_line_bytes <= line_limit:
            status, what = 431, "request head"
        else:
            status, what = 414, "request line"
        self._refuse(status, f"{what} longer than {self._max_head_bytes} bytes")
        return False

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` between two requests (no aiohttp response exists) and close."""
        if self._lingering is not None:
            self._lingering.write(refusal_bytes(status, message))
        self.force_close()

    def eof_received(self) -> None:
        # The client is done: no need to linger for it any longer.
        if self._lingering is not None and self._lingering.is_closing():
            self._lingering.cancel_linger()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._lingering is not None:
            self._lingering.cancel_linger()
        self._owner.release(self)
        super().connection_lost(exc)

    def head_received(self) -> None:
        """The request's head is in (called first thing by the middleware)."""
        self._awaiting_head = False
        self._stop_head_timer()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        self._await_head()  # the next request's head, on a kept-alive connection
        return answered

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        limits = self._owner.limits
        if isinstance(exc, LineTooLong):
            limit = exc.args[1]
            if limit == self.max_line_size and limit != self.max_field_size:
                status, message = 414, f"request line longer than {limit} bytes"
            else:
                status, message = 431, f"a header field longer than {limit} bytes"
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
            status, message = 431, f"more than {limits.max_header_count} header fields"
        elif isinstance(exc, HttpProcessingError):
            status, message = exc.code or 400, f"malformed request: {exc.message}"
        elif status >= 500:
            log.error("failed answering %s", peer_of(request) or "?", exc_info=exc)
            message = "internal error; see the log"
        if request.writer.output_size > 0:
            raise ConnectionError("the answer is under way; the connection is cut instead")
        return json_error(status, message or HTTPStatus(status).phrase, close=True)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._awaiting_head = True
        self._head_bytes, self._head_tail, self._head_line_bytes = 0, b"", 0
        self._head_timer = asyncio.get_running_loop().call_later(
            self._owner.limits.head_timeout_s, self._head_late
        )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self._lingering is None or self._lingering.is_closing():
            return
        if self._head_bytes:  # a slow client: say why; an idle one just goes
            timeout = self._owner.limits.head_timeout_s
            self._refuse(408, f"request head not received in {timeout:g} s")
        else:
            self.force_close()


class _Busy(asyncio.Protocol):
    """A connection over the cap: 503 at once, a lingering close, never reaches aiohttp.

    Beyond as many refusals as the cap again, a reset is answer enough.
    """

    def __init__(self, owner: BoundedHttpServer, *, refuse: bool) -> None:
        self._owner = owner
        self._refuse = refuse
        self._transport: asyncio.Transport | None = None
        self._lingering: _LingeringTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if not self._refuse:
            self._transport.abort()
            return
        self._transport.write(refusal_bytes(503, "too many connections; retry"))
        self._lingering = _LingeringTransport(self._transport, self._owner)
        self._lingering.close()

    def data_received(self, data: bytes) -> None:
        """Dropped: it is not going to be served."""

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel_linger()
        self._owner.release(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
