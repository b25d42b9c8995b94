"""The admin HTTP server's bounds, against a real server on 127.0.0.1:0 and a raw client.

Each limit of :class:`HttpLimits` is hit the way an abusive client would: a long request line,
too many or too large headers, a huge body, a head or body that trickles in, an answer never
read, one connection too many. The answer must be the limit's status in JSON, and the
connection closed; a silent or idle connection is closed unanswered at the head deadline.
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


#: Larger than what the socket buffers of both ends of a loopback connection hold.
BIG_BYTES = 32 * 1024 * 1024


def _big(request: AdminRequest) -> AdminResponse:
    return AdminResponse(200, b"x" * BIG_BYTES, content_type="application/octet-stream")


def _fail(request: AdminRequest) -> AdminResponse:
    if request.query.get("kind") == "value":
        raise ValueError("bad value")
    raise RuntimeError("a bug")


@contextlib.asynccontextmanager
async def _serving(limits: HttpLimits | None = None) -> AsyncIterator[int]:
    server = AdminServer(limits)
    for method in ("GET", "PUT"):
        server.route(method, "/echo", _echo)
    server.route("GET", "/big", _big)
    server.route("GET", "/fail", _fail)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.stop()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the next answer; an answer that says ``Connection: close``
    must be followed by the server's close (every refusal is)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=15)
    fields = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line)
    body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
    if fields.get(b"connection") == b"close":
        assert await asyncio.wait_for(reader.read(), timeout=15) == b"", "not closed"
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


async def _exchange(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await _answer(reader)
    finally:
        writer.close()


async def _eventually_served(port: int) -> int:
    """The status of ``GET /echo`` once it is no longer 503 (polled, within a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        status, _ = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        if status != 503 or loop.time() > deadline:
            return status
        await asyncio.sleep(0.05)  # polling for the slot, bounded by the deadline


async def test_defaults_are_the_documented_bounds() -> None:
    limits = HttpLimits()
    assert (
        limits.max_request_line_bytes,
        limits.max_header_count,
        limits.max_header_bytes,
        limits.max_body_bytes,
        limits.head_timeout_s,
        limits.body_timeout_s,
        limits.write_timeout_s,
        limits.max_connections,
        limits.linger_s,
    ) == (8 * 1024, 100, 16 * 1024, 64 * 1024, 10.0, 10.0, 10.0, 64, 2.0)
    with pytest.raises(ValueError, match="max_connections"):
        HttpLimits(max_connections=0)


async def test_request_within_every_bound_is_served() -> None:
    # With Host and Content-Length, exactly the most header fields allowed.
    headers = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT - 2))
    body = b"x" * MAX_BODY_BYTES
    request = b"PUT /echo HTTP/1.1\r\nHost: a\r\n%bContent-Length: %d\r\n\r\n%b" % (
        headers,
        len(body),
        body,
    )
    async with _serving() as port:
        assert await _exchange(port, request) == (
            200,
            {"headers": MAX_HEADER_COUNT, "body_bytes": MAX_BODY_BYTES},
        )


async def test_request_line_over_the_limit_is_414() -> None:
    target = b"/echo?" + b"a" * MAX_REQUEST_LINE_BYTES
    async with _serving() as port:
        status, body = await _exchange(port, b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert status == 414
    assert "request line" in body["error"]


async def test_request_line_far_over_the_limit_in_one_write_is_414() -> None:
    # More than the whole head may hold, in one segment: refused before the parser holds it.
    target = b"/echo?" + b"a" * (4 * (MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES))
    async with _serving() as port:
        status, body = await _exchange(port, b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert status == 414
    assert "request line" in body["error"]


async def test_head_far_over_the_byte_limit_in_one_write_is_431() -> None:
    fields = b"".join(b"X-Big-%d: %b\r\n" % (i, b"b" * (MAX_HEADER_BYTES // 2)) for i in range(8))
    async with _serving() as port:
        status, body = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n%b\r\n" % fields)
    assert status == 431
    assert "head" in body["error"]


async def test_one_header_field_too_many_is_431() -> None:
    headers = b"".join(b"X-N%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT))  # and Host
    async with _serving() as port:
        status, body = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n%b\r\n" % headers)
    assert status == 431
    assert str(MAX_HEADER_COUNT) in body["error"]


async def test_headers_over_the_byte_limit_are_431() -> None:
    big = b"X-Big: " + b"b" * (MAX_HEADER_BYTES // 2) + b"\r\n"
    async with _serving() as port:
        status, _ = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n%b%b\r\n" % (big, big))
    assert status == 431


async def test_megabytes_of_headers_are_refused_without_being_held() -> None:
    # Distinct names, so a server that keeps them all holds every byte.
    fields = 4096
    pad = b"p" * 2000
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
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
    request = b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    async with _serving() as port:
        status, body = await _exchange(port, request)
    assert status == 413
    assert str(MAX_BODY_BYTES) in body["error"]


async def test_chunked_body_is_411() -> None:
    request = (
        b"PUT /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    async with _serving() as port:
        status, _ = await _exchange(port, request)
    assert status == 411


async def test_head_trickling_in_is_cut_off_by_the_head_deadline() -> None:
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            # Each byte comes well within any per-read timeout; only a deadline ends it.
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
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


async def test_silent_connection_is_closed_unanswered_at_the_head_deadline() -> None:
    one = replace(SHORT, max_connections=1)
    async with _serving(one) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(reader.read(), timeout=15) == b""
        finally:
            writer.close()
        # Its slot is free again: the next connection is served.
        assert await _eventually_served(port) == 200


async def test_idle_keep_alive_connection_is_closed_at_the_head_deadline() -> None:
    async with _serving(SHORT) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            assert (await _answer(reader))[0] == 200
            assert await asyncio.wait_for(reader.read(), timeout=15) == b""
        finally:
            writer.close()


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with _serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):
                writer.write(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
                await writer.drain()
                assert await _answer(reader) == (200, {"headers": 1, "body_bytes": 0})
        finally:
            writer.close()


async def test_answer_a_client_does_not_read_is_cut_at_the_write_deadline() -> None:
    # Far more than the socket buffers of both ends hold, so the answer cannot be taken.
    one = replace(SHORT, max_connections=1, write_timeout_s=0.5)
    async with _serving(one) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            # Never read: only the write deadline can free the one slot.
            assert await _eventually_served(port) == 200
        finally:
            writer.close()


async def test_unknown_path_and_wrong_method_are_json_404_and_405() -> None:
    async with _serving() as port:
        assert await _exchange(port, b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n") == (
            404,
            {"error": "no route /nope"},
        )
        assert await _exchange(port, b"POST /echo HTTP/1.1\r\nHost: a\r\n\r\n") == (
            405,
            {"error": "use GET, PUT"},
        )


async def test_malformed_request_is_a_json_400() -> None:
    async with _serving() as port:
        status, body = await _exchange(port, b"GET /echo NOT-HTTP\r\n\r\n")
    assert status == 400
    assert "malformed" in body["error"]


async def test_route_failing_with_value_error_is_400_and_any_other_500() -> None:
    async with _serving() as port:
        assert await _exchange(port, b"GET /fail?kind=value HTTP/1.1\r\nHost: a\r\n\r\n") == (
            400,
            {"error": "bad value"},
        )
        status, body = await _exchange(port, b"GET /fail HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 500
    assert "internal error" in body["error"]


async def test_body_stalling_is_408_after_the_body_deadline() -> None:
    request = b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-part"
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
            status, body = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status == 503
            assert "connections" in body["error"]
            held.pop()[1].close()
            deadline = asyncio.get_running_loop().time() + 5
            while status == 503 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)  # the server has yet to see the close
                status, _ = await _exchange(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status == 200
        finally:
            for _, writer in held:
                writer.close()
