"""The admin HTTP server's bounds, against a real server on 127.0.0.1:0 and a raw client.

Each limit of :class:`HttpLimits` is hit the way an abusive client would: a long request line,
too many or too large headers, a huge body, a head or body that trickles in, one connection
too many. The answer must be the limit's status, and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from services.mesh.admin import (
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_REQUEST_LINE_BYTES,
    AdminRequest,
    AdminResponse,
    AdminServer,
    HttpLimits,
)

SHORT = replace(HttpLimits(), head_timeout_s=0.5, body_timeout_s=0.5, linger_s=0.5)


def _echo(request: AdminRequest) -> AdminResponse:
    return AdminResponse.of_json({"headers": len(request.headers), "body_bytes": len(request.body)})


@contextlib.asynccontextmanager
async def _serving(limits: HttpLimits | None = None) -> AsyncIterator[int]:
    server = AdminServer(limits)
    for method in ("GET", "PUT"):
        server.route(method, "/echo", _echo)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.stop()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the one answer, read until the server closes."""
    raw = await asyncio.wait_for(reader.read(), timeout=15)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


async def _exchange(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await _answer(reader)
    finally:
        writer.close()


async def test_defaults_are_the_documented_bounds() -> None:
    limits = HttpLimits()
    assert (
        limits.max_request_line_bytes,
        limits.max_header_count,
        limits.max_header_bytes,
        limits.max_body_bytes,
        limits.head_timeout_s,
        limits.body_timeout_s,
        limits.max_connections,
    ) == (8 * 1024, 100, 16 * 1024, 64 * 1024, 10.0, 10.0, 64)
    with pytest.raises(ValueError, match="max_connections"):
        HttpLimits(max_connections=0)


async def test_request_within_every_bound_is_served() -> None:
    headers = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT - 1))
    body = b"x" * MAX_BODY_BYTES
    request = b"PUT /echo HTTP/1.1\r\n%bContent-Length: %d\r\n\r\n%b" % (headers, len(body), body)
    async with _serving() as port:
        assert await _exchange(port, request) == (
            200,
            {"headers": MAX_HEADER_COUNT, "body_bytes": MAX_BODY_BYTES},
        )


async def test_request_line_over_the_limit_is_414() -> None:
    target = b"/echo?" + b"a" * MAX_REQUEST_LINE_BYTES
    async with _serving() as port:
        status, body = await _exchange(port, b"GET %b HTTP/1.1\r\n\r\n" % target)
    assert status == 414
    assert "request line" in body["error"]


async def test_one_header_field_too_many_is_431() -> None:
    headers = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    async with _serving() as port:
        status, body = await _exchange(port, b"GET /echo HTTP/1.1\r\n%b\r\n" % headers)
    assert status == 431
    assert str(MAX_HEADER_COUNT) in body["error"]


async def test_headers_over_the_byte_limit_are_431() -> None:
    big = b"X-Big: " + b"b" * (MAX_HEADER_BYTES // 2) + b"\r\n"
    async with _serving() as port:
        status, _ = await _exchange(port, b"GET /echo HTTP/1.1\r\n%b%b\r\n" % (big, big))
    assert status == 431


async def test_megabytes_of_headers_are_refused_without_being_held() -> None:
    # Distinct names, so a server that keeps them all holds every byte.
    fields = 4096
    pad = b"p" * 2000
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET /echo HTTP/1.1\r\n")
                for i in range(fields):
                    writer.write(b"X-Pad-%d: %b\r\n" % (i, pad))
                    await writer.drain()
                writer.write(b"\r\n")
                await writer.drain()

        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            flooding = asyncio.create_task(flood())
            status, _ = await _answer(reader)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
            writer.close()
    assert status == 431
    # About 8 MiB were offered; what client and server held at once stays far below that.
    assert peak - before < 1024 * 1024


async def test_body_over_the_limit_is_413_before_it_is_sent() -> None:
    request = b"PUT /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    async with _serving() as port:
        status, body = await _exchange(port, request)
    assert status == 413
    assert str(MAX_BODY_BYTES) in body["error"]


async def test_chunked_body_is_411() -> None:
    request = b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with _serving() as port:
        status, _ = await _exchange(port, request)
    assert status == 411


async def test_head_trickling_in_is_cut_off_by_the_head_deadline() -> None:
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            # Each byte comes well within any per-read timeout; only a deadline ends it.
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET /echo HTTP/1.1\r\n")
                for _ in range(200):
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        try:
            status, body = await _answer(reader)
        finally:
            trickling.cancel()
            writer.close()
    assert status == 408
    assert "head" in body["error"]


async def test_silent_connection_is_408_after_the_head_deadline() -> None:
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            status, _ = await _answer(reader)
        finally:
            writer.close()
    assert status == 408


async def test_body_stalling_is_408_after_the_body_deadline() -> None:
    request = b"PUT /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-part"
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            status, body = await _answer(reader)
        finally:
            writer.close()
    assert status == 408
    assert "body" in body["error"]


async def test_connection_beyond_the_cap_is_503_until_one_closes() -> None:
    async with _serving() as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        try:
            status, body = await _exchange(port, b"GET /echo HTTP/1.1\r\n\r\n")
            assert status == 503
            assert "connections" in body["error"]
            held.pop()[1].close()
            deadline = asyncio.get_running_loop().time() + 5
            while status == 503 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)  # the server has yet to see the close
                status, _ = await _exchange(port, b"GET /echo HTTP/1.1\r\n\r\n")
            assert status == 200
        finally:
            for _, writer in held:
                writer.close()
