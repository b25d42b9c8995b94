"""The HTTP partner wrapper against a real local http.server that fails on command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import CallError, PartnerCallError
from tests.integration.harness import eventually, make_chain

PARTNER = "exchange-rate"


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    hold_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Partner:
    """What the fake partner answers, and what it saw."""

    script: deque[Reply] = field(default_factory=deque)
    default: Reply = field(default_factory=Reply)
    seen: list[tuple[str, str, dict[str, str], float]] = field(default_factory=list)
    url: str = ""

    def count(self) -> int:
        return len(self.seen)


@contextlib.contextmanager
def partner_server() -> Iterator[Partner]:
    partner = Partner()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            partner.seen.append((self.command, self.path, dict(self.headers), time.monotonic()))
            reply = partner.script.popleft() if partner.script else partner.default
            time.sleep(reply.hold_s)  # the partner being slow, on its own thread
            payload = json.dumps({"path": self.path, "echo": body.decode() or None}).encode()
            # A held reply may find its client gone (it timed out or was cancelled).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(reply.status)
                for key, value in reply.headers:
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    partner.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield partner
    finally:
        server.shutdown()
        server.server_close()


async def test_get_503_twice_then_200_succeeds_on_third_attempt() -> None:
    with partner_server() as partner:
        partner.script.extend([Reply(503), Reply(503)])
        client = make_chain().http_client(PARTNER, partner.url)
        status, body = await client.request("GET", "/rates?base=EUR")
    assert (status, body["path"], partner.count()) == (200, "/rates?base=EUR", 3)


async def test_post_without_idempotency_key_is_sent_once() -> None:
    with partner_server() as partner:
        partner.script.append(Reply(503))
        client = make_chain().http_client(PARTNER, partner.url)
        with pytest.raises(PartnerCallError) as caught:
            await client.request("POST", "/transfers", json={"amount_minor": 100})
    assert (partner.count(), caught.value.stop_reason, caught.value.http_status) == (
        1,
        "not_retryable",
        503,
    )


async def test_post_with_idempotency_key_is_retried_with_the_same_key() -> None:
    with partner_server() as partner:
        partner.script.append(Reply(503))
        client = make_chain().http_client(PARTNER, partner.url)
        status, _ = await client.request("POST", "/transfers", json={}, idempotency_key="k-1")
    assert status == 200
    assert [seen[2].get("Idempotency-Key") for seen in partner.seen] == ["k-1", "k-1"]


async def test_business_error_is_returned_once_and_leaves_breaker_closed() -> None:
    chain = make_chain()
    with partner_server() as partner:
        partner.default = Reply(404)
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(6):
            status, _ = await client.request("GET", "/rates/XXX")
            assert status == 404
    assert partner.count() == 6
    assert chain.breakers.states() == {PARTNER: "closed"}


async def test_partner_breaker_trip_stops_requests_reaching_it() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    with partner_server() as partner:
        partner.default = Reply(503)
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(10):
            with pytest.raises(CallError):
                await client.request("GET", "/rates")
        with pytest.raises(CallError) as caught:
            await client.request("GET", "/rates")
    assert partner.count() == 5
    assert caught.value.stop_reason == "breaker_open"


async def test_retry_after_is_honoured_as_pushback() -> None:
    with partner_server() as partner:
        partner.script.append(Reply(429, headers=(("Retry-After", "0.3"),)))
        client = make_chain().http_client(PARTNER, partner.url)
        await client.request("GET", "/rates")
    first, second = partner.seen[0][3], partner.seen[1][3]
    assert second - first >= 0.3


async def test_partner_deadline_is_overall_across_retries() -> None:
    chain = make_chain({"retry": {"max_attempts": 50}, "breaker": {"minimum_calls": 1_000_000}})
    with partner_server() as partner:
        partner.default = Reply(503, hold_s=0.1)
        client = chain.http_client(PARTNER, partner.url)
        with pytest.raises(PartnerCallError) as caught:
            await client.request("GET", "/rates", timeout_s=0.5)
    assert caught.value.stop_reason == "deadline"
    assert caught.value.attempts < 50


async def test_slow_partner_times_out_within_the_deadline() -> None:
    with partner_server() as partner:
        partner.default = Reply(200, hold_s=2.0)
        client = make_chain({"retry": {"max_attempts": 1}}).http_client(PARTNER, partner.url)
        with pytest.raises(PartnerCallError) as caught:
            await client.request("GET", "/rates", timeout_s=0.3)
    assert caught.value.code().name == "DEADLINE_EXCEEDED"


async def test_unreachable_partner_is_unavailable() -> None:
    with partner_server() as partner:
        url = partner.url
    client = make_chain({"retry": {"max_attempts": 2}}).http_client(PARTNER, url)
    with pytest.raises(PartnerCallError) as caught:
        await client.request("GET", "/rates")
    assert (caught.value.code().name, caught.value.attempts) == ("UNAVAILABLE", 2)


async def test_partner_retry_budget_bounds_attempts_during_an_outage() -> None:
    policy = {"budget": {"min_retries": 2}, "breaker": {"minimum_calls": 1_000_000}}
    chain = make_chain(policy)
    calls = 20
    with partner_server() as partner:
        partner.default = Reply(503)
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(calls):
            with pytest.raises(PartnerCallError):
                await client.request("GET", "/rates")
    assert partner.count() <= 1.2 * calls + 2


CALLS = 12
#: Longer than any deadline below; short enough that the partner's threads end soon after.
HELD = Reply(200, hold_s=2.0)


async def test_short_propagated_deadlines_never_open_the_partners_breaker() -> None:
    chain = make_chain({"timeout_s": 5.0})
    with partner_server() as partner:
        partner.default = HELD
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(CALLS):
            token = set_incoming_deadline(0.2)  # inside a handler whose caller gave it 200 ms
            try:
                with pytest.raises(PartnerCallError) as caught:
                    await client.request("GET", "/rates")
            finally:
                reset_incoming_deadline(token)
            assert caught.value.code().name == "DEADLINE_EXCEEDED"
    assert chain.breakers.states() == {PARTNER: "closed"}


async def test_timeouts_within_the_policys_own_timeout_open_the_partners_breaker() -> None:
    chain = make_chain({"timeout_s": 0.1})
    with partner_server() as partner:
        partner.default = HELD
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(CALLS):
            with pytest.raises(PartnerCallError):
                await client.request("GET", "/rates")
    assert partner.count() <= 5  # once open, nothing more reaches the partner
    assert chain.breakers.states() == {PARTNER: "open"}


async def test_requests_the_caller_cancels_never_open_the_partners_breaker() -> None:
    chain = make_chain()
    with partner_server() as partner:
        partner.default = HELD
        client = chain.http_client(PARTNER, partner.url)
        calls = [asyncio.create_task(client.request("GET", "/rates")) for _ in range(CALLS)]
        await eventually(lambda: partner.count() == CALLS)
        for call in calls:
            call.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert chain.breakers.states() == {PARTNER: "closed"}
