"""The mesh console's HTTP server: one page, its two static files and ``GET /api/mesh``.

Runs on aiohttp within the admin endpoint's bounds (:class:`BoundedHttpServer`), GET only,
on the loopback unless ``PAYMESH_CONSOLE_ADDR`` says otherwise; on the loopback it answers
only requests addressed to a loopback name (no DNS rebinding from a web page). The mesh is
asked at most once per :data:`REFRESH_S` whatever the number of open pages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from services.mesh.admin import BoundedHttpServer, HttpLimits, bounded_app, json_error
from services.mesh.topology import Topology
from services.tools.console.snapshot import mesh_snapshot

log = logging.getLogger("paymesh.console")

#: The name ``/healthz`` answers with, and the launcher's member name.
CONSOLE_NAME = "mesh-console"
#: A snapshot younger than this is served as it is; the page polls every second.
REFRESH_S = 1.0
#: How long a request waits for a round of the mesh before it gets the previous snapshot.
ROUND_WAIT_S = 5.0
#: GET only: no request has a body worth more than this.
CONSOLE_LIMITS = HttpLimits(max_body_bytes=1024, max_connections=32)
#: The page and what it loads, served from memory (no path ever reaches the file system).
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
}
#: Everything the page needs comes from the console itself; nothing runs that it did not send.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class MeshWatch:
    """The latest snapshot of the mesh; one round at a time, shared by every request."""

    def __init__(self, take: Snapshot, *, refresh_s: float = REFRESH_S) -> None:
        self._take = take
        self._refresh_s = refresh_s
        self._latest: dict[str, Any] | None = None
        self._taken_at = float("-inf")
        self._round: asyncio.Task[dict[str, Any]] | None = None

    async def current(self) -> dict[str, Any]:
        """A snapshot at most ``refresh_s`` old, or the last one while a slow round runs.

        Raises:
            RuntimeError: no round has ever finished and this one failed or is late.
        """
        if time.monotonic() - self._taken_at < self._refresh_s and self._latest is not None:
            return self._latest
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._take_round())
            # A round that fails after every request stopped waiting is still looked at.
            self._round.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(self._round), ROUND_WAIT_S)
        except TimeoutError:
            if self._latest is None:
                raise RuntimeError(f"the mesh did not answer in {ROUND_WAIT_S:g} s") from None
            return {**self._latest, "stale": True}

    async def _take_round(self) -> dict[str, Any]:
        snapshot = await self._take()
        self._latest, self._taken_at = snapshot, time.monotonic()
        return snapshot

    async def close(self) -> None:
        """Cancel a round in flight."""
        if self._round is not None and not self._round.done():
            self._round.cancel()


def _retrieve(round_: asyncio.Task[dict[str, Any]]) -> None:
    if not round_.cancelled() and round_.exception() is not None:
        log.debug("a round of the mesh failed: %s", round_.exception())


def _static_body(name: str) -> bytes:
    return resources.files("services.tools.console").joinpath("static", name).read_bytes()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """The name of a ``Host`` header without its port; an IPv6 name keeps its brackets."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class ConsoleServer:
    """The console on a :class:`BoundedHttpServer`."""

    def __init__(self, topology: Topology, *, take: Snapshot | None = None) -> None:
        self.topology = topology
        self._session: aiohttp.ClientSession | None = None
        self.watch = MeshWatch(take or self._mesh_snapshot)
        self._pages = {path: (_static_body(name), kind) for path, (name, kind) in STATIC.items()}
        self._http: BoundedHttpServer | None = None
        self._loopback_only = True

    async def _mesh_snapshot(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await mesh_snapshot(self.topology, self._session)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for any free port); returns the bound port."""
        self._loopback_only = _is_loopback(host)
        app = bounded_app(CONSOLE_LIMITS)
        app.middlewares.append(self._guard)
        for path in self._pages:
            app.router.add_get(path, self._page)
        app.router.add_get("/api/mesh", self._api_mesh)
        app.router.add_get("/healthz", self._healthz)
        self._http = BoundedHttpServer(app, CONSOLE_LIMITS)
        return await self._http.start(host, port)

    async def stop(self) -> None:
        """Stop listening, end connections, close the admin client."""
        http, self._http = self._http, None
        if http is not None:
            await http.stop()
        await self.watch.close()
        if self._session is not None:
            await self._session.close()

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Loopback names only, on a loopback bind; the same headers on every answer."""
        if self._loopback_only and _host_name(request.host) not in _LOOPBACK_NAMES:
            response: web.StreamResponse = json_error(
                421, f"the console answers on the loopback only, not as {request.host!r}"
            )
        else:
            response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _page(self, request: web.Request) -> web.Response:
        body, kind = self._pages[request.path]
        return web.Response(body=body, headers={"Content-Type": kind})

    async def _api_mesh(self, request: web.Request) -> web.Response:
        try:
            snapshot = await self.watch.current()
        except Exception as exc:  # the page shows why instead of a blank graph
            log.warning("cannot read the mesh: %s", exc)
            return json_error(503, f"cannot read the mesh: {exc}")
        return web.json_response(snapshot)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": CONSOLE_NAME})
