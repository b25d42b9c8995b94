"""The mesh console's HTTP server on 127.0.0.1 port 0: ``GET /api/mesh`` from a real service over
mTLS as the operator, the page's files with a strict content policy, and every refusal in JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.mesh.tls import PKI_DIR_VAR
from services.mesh.topology import SERVICES, Topology
from services.order.__main__ import build
from services.tools.console.server import ConsoleServer, MeshWatch
from services.tools.ports import free_port
from tests.servers import running_service, test_pki_dir

TARGET = "order-service"


def _nobody_else(addresses: Mapping[str, str]) -> dict[str, str]:
    """Free (so DOWN) addresses for every service not in ``addresses``, the test PKI."""
    environ = {PKI_DIR_VAR: str(test_pki_dir())}
    for spec in SERVICES:
        environ[spec.addr_var] = addresses.get(spec.name, f"127.0.0.1:{free_port()}")
        environ[f"{spec.env_prefix}_ADMIN_ADDR"] = f"127.0.0.1:{free_port()}"
    return environ


async def _console(topology: Topology, **kwargs: Any) -> tuple[ConsoleServer, str]:
    console = ConsoleServer(topology, **kwargs)
    port = await console.start("127.0.0.1", 0)
    return console, f"http://127.0.0.1:{port}"


@pytest.fixture
async def idle_console() -> AsyncIterator[str]:
    """A console over a mesh where nothing runs."""
    console, url = await _console(Topology(environ=_nobody_else({})))
    try:
        yield url
    finally:
        await console.stop()


async def _get(url: str, **kwargs: Any) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as reply:
        return reply.status, reply.headers, await reply.read()


async def test_api_mesh_shows_a_running_service_serving_and_the_others_down(
    tmp_path: Path,
) -> None:
    async with running_service(TARGET, build, environ={"PAYMESH_VAR_DIR": str(tmp_path)}) as addr:
        console, url = await _console(Topology(environ=_nobody_else({TARGET: addr})))
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/api/mesh") as reply:
                    assert reply.status == 200
                    model = await reply.json()
        finally:
            await console.stop()

    health = {n["id"]: n["health"] for n in model["nodes"] if n["health"] != "partner"}
    assert health.pop(TARGET) == "serving"
    assert len(health) == 10 and set(health.values()) == {"down"}
    assert model["summary"]["serving"] == 1
    declared = sum(len(s.calls) + len(s.partners) for s in SERVICES)
    assert len(model["edges"]) == declared
    assert {e["breaker"] for e in model["edges"]} == {"none"}  # no caller gave a report
    assert {e["where"] for e in model["errors"]} == set(health)  # why each gave none


async def test_the_page_and_its_files_come_from_the_console_under_a_strict_policy(
    idle_console: str,
) -> None:
    for path, kind in (("/", "text/html"), ("/console.js", "javascript"), ("/console.css", "css")):
        status, headers, body = await _get(f"{idle_console}{path}")
        assert status == 200 and kind in headers["Content-Type"], path
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body  # nothing from a CDN: it works offline
    script = (await _get(f"{idle_console}/console.js"))[2]
    assert b"innerHTML" not in script  # text from the mesh only ever goes in as textContent


async def test_a_method_other_than_get_is_refused_in_json(idle_console: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{idle_console}/api/mesh", data=b"{}") as reply:
            assert reply.status == 405
            assert "GET" in (await reply.json())["error"]


async def test_an_unknown_path_is_a_json_404(idle_console: str) -> None:
    status, _, body = await _get(f"{idle_console}/static/../../etc/passwd")
    assert status == 404 and b'"error"' in body


async def test_a_request_for_another_host_name_is_refused(idle_console: str) -> None:
    """A page elsewhere that rebinds its own name to 127.0.0.1 cannot read the mesh."""
    status, _, body = await _get(f"{idle_console}/api/mesh", headers={"Host": "evil.example"})
    assert status == 421 and b"loopback" in body


async def test_a_body_over_the_limit_is_refused_before_it_is_read(idle_console: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{idle_console}/api/mesh", data=b"x" * 4096) as reply:
            assert reply.status == 413


async def test_a_mesh_that_cannot_be_read_is_a_json_503_naming_why() -> None:
    async def broken() -> dict[str, Any]:
        raise OSError("operator certificate unreadable")

    console, url = await _console(Topology(environ=_nobody_else({})), take=broken)
    try:
        status, _, body = await _get(f"{url}/api/mesh")
    finally:
        await console.stop()
    assert status == 503 and b"operator certificate unreadable" in body


async def test_pages_polling_at_once_share_one_round_of_the_mesh() -> None:
    rounds = 0
    release = asyncio.Event()

    async def take() -> dict[str, Any]:
        nonlocal rounds
        rounds += 1
        await release.wait()
        return {"round": rounds}

    watch = MeshWatch(take, refresh_s=60.0)
    waiting = [asyncio.create_task(watch.current()) for _ in range(5)]
    await asyncio.sleep(0)  # let every request reach the round
    release.set()
    answers = await asyncio.gather(*waiting)
    assert answers == [{"round": 1}] * 5
    assert await watch.current() == {"round": 1}  # fresh enough: no new round
    assert rounds == 1
