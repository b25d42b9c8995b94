"""The admin HTTP endpoint of every service: ``/metrics`` for Prometheus, ``/faults`` for chaos.

A few routes on the admin port the topology declares, served from the service's own event
loop with asyncio streams (no extra HTTP dependency). It is for operators and scrapers on
the loopback, not for merchants.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("paymesh.admin")

MAX_BODY_BYTES = 1 << 20


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

    @classmethod
    def of_json(cls, value: Any, status: int = 200) -> AdminResponse:
        """A JSON answer."""
        return cls(status, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


Route = Callable[[AdminRequest], Awaitable[AdminResponse] | AdminResponse]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Error",
}


class AdminServer:
    """A tiny HTTP/1.1 server with exact-path routes."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._server: asyncio.Server | None = None

    def route(self, method: str, path: str, handler: Route) -> None:
        """Serve ``method path`` with ``handler``."""
        self._routes[(method.upper(), path)] = handler

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        self._server = await asyncio.start_server(self._handle, host.strip("[]"), port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read(reader)
            response = await self._dispatch(request) if request else AdminResponse(400, b"")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            response = AdminResponse.of_json({"error": "malformed request"}, 400)
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + response.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> AdminRequest | None:
        line = (await reader.readline()).decode("latin-1").split()
        if len(line) < 2:
            return None
        headers: dict[str, str] = {}
        while (raw := (await reader.readline()).decode("latin-1").strip()) != "":
            key, _, value = raw.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(line[1])
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return AdminRequest(line[0].upper(), url.path, query, body)

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
