"""A scripted HTTP partner on aiohttp.web (127.0.0.1, port 0): answers as told, records requests.

Unlike ``http.server`` it keeps connections alive, so tests can see the client's pool: each
request records the client's port, and every connection the server holds is listed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Answer:
    """One scripted answer."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    chunked: bool = False
    """Send the body chunked (no Content-Length)."""
    hold_s: float = 0.0
    """Seconds the partner takes before answering."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the partner received."""

    method: str
    path: str
    headers: dict[str, str]
    client_port: int


@dataclass
class ScriptedPartner:
    """What the partner answers, and what it saw."""

    url: str = ""
    script: deque[Answer] = field(default_factory=deque)
    default: Answer = field(default_factory=Answer)
    seen: list[Seen] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    def count(self, path: str | None = None) -> int:
        return sum(1 for s in self.seen if path is None or s.path.split("?")[0] == path)

    def open_connections(self) -> int:
        """Connections from clients the server still holds open."""
        return sum(1 for t in set(self.transports) if not t.is_closing())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        self.transports.append(transport)
        port = transport.get_extra_info("peername")[1]
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), port))
        await request.read()
        answer = self.script.popleft() if self.script else self.default
        if answer.hold_s:
            await asyncio.sleep(answer.hold_s)
        response = web.StreamResponse(status=answer.status, headers=dict(answer.headers))
        if answer.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(answer.body)
        await response.prepare(request)
        await response.write(answer.body)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def scripted_partner() -> AsyncIterator[ScriptedPartner]:
    """A running partner for the duration of the block."""
    partner = ScriptedPartner()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", partner.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    partner.url = f"http://{host}:{port}"
    try:
        yield partner
    finally:
        await runner.cleanup()
