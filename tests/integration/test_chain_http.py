"""The HTTP partner wrapper against a real local http.server that fails on command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.rpc import status_pb2

from interceptors.chain import ClientChain
from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import CallError, PartnerCallError, error_info, retry_delay_of
from interceptors.http import PartnerClient
from tests.integration.harness import ShiftedClock, eventually, make_chain

PARTNER = "exchange-rate"


@pytest.fixture(autouse=True)
async def _pools_closed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Every partner client a test makes has its connection pool closed after it."""
    made: list[PartnerClient] = []
    make = ClientChain.http_client

    def recorded(chain: ClientChain, partner: str, base_url: str) -> PartnerClient:
        made.append(make(chain, partner, base_url))
        return made[-1]

    monkeypatch.setattr(ClientChain, "http_client", recorded)
    yield
    for client in made:
        await client.aclose()


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
    gate: threading.Event | None = None
    """When set to an Event, every request is held until it is set (or 10 s passed)."""

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
            if partner.gate is not None:
                partner.gate.wait(10.0)  # a partner that stopped answering, until released
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
    chain = make_chain(
        {
            "retry": {"max_attempts": 50},
            "breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000},
        }
    )
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
    policy = {
        "budget": {"min_retries": 2},
        "breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000},
    }
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


# --- hang detection: consecutive failures, slow requests in flight, the limit in flight ------


async def test_partner_five_failures_in_a_row_open_it_though_the_window_holds_successes() -> None:
    chain = make_chain({"retry": {"max_attempts": 1}})
    with partner_server() as partner:
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(20):
            await client.request("GET", "/rates")
        partner.default = Reply(503)
        for _ in range(10):
            with pytest.raises(PartnerCallError):
                await client.request("GET", "/rates")
    assert partner.count() == 20 + 5
    assert chain.breakers.states() == {PARTNER: "open"}
    assert chain.telemetry.value("breaker_trips_total", rule="consecutive_failures") == 1


async def test_partner_requests_beyond_its_limit_in_flight_are_refused_at_once() -> None:
    chain = make_chain({"breaker": {"max_concurrent_calls": 2}})
    with partner_server() as partner:
        partner.gate = threading.Event()
        client = chain.http_client(PARTNER, partner.url)
        held = [asyncio.create_task(client.request("GET", "/rates")) for _ in range(2)]
        await eventually(lambda: partner.count() == 2)
        with pytest.raises(PartnerCallError) as caught:
            await client.request("GET", "/rates")
        assert partner.count() == 2  # the refused request never reached the partner
        partner.gate.set()
        await asyncio.gather(*held)
    error = caught.value
    assert (error.code().name, error.stop_reason, error.attempts, error.http_status) == (
        "UNAVAILABLE",
        "concurrency_limited",
        0,
        None,
    )
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    info = error_info(status)
    assert info is not None
    assert (info.reason, retry_delay_of(status)) == ("CONCURRENCY_LIMITED", 2.5)
    assert chain.telemetry.value("concurrency_limited_total", target=PARTNER) == 1
    assert chain.breakers.states() == {PARTNER: "closed"}


async def test_a_hung_partner_opens_the_breaker_and_fails_the_requests_in_flight() -> None:
    clock = ShiftedClock()
    chain = make_chain({"timeout_s": 30.0}, clock=clock)
    with partner_server() as partner:
        partner.gate = threading.Event()  # never set while the test waits: no answer comes
        client = chain.http_client(PARTNER, partner.url)
        hung = [asyncio.create_task(client.request("GET", "/rates")) for _ in range(3)]
        await eventually(lambda: partner.count() == 3)
        clock.advance(2.5)  # the three have run the slow-call duration, on the breaker's clock
        with pytest.raises(PartnerCallError) as refused:
            await client.request("GET", "/rates")
        results = await asyncio.gather(*hung, return_exceptions=True)
        partner.gate.set()
    assert refused.value.stop_reason == "breaker_open"
    failed = [r for r in results if isinstance(r, PartnerCallError)]
    assert len(failed) == 3
    assert {(r.code().name, r.stop_reason, r.attempts) for r in failed} == {
        ("UNAVAILABLE", "breaker_open", 1)
    }
    assert chain.breakers.states() == {PARTNER: "open"}
    assert chain.telemetry.value("breaker_aborted_total", target=PARTNER) == 3
    assert chain.breakers.readouts()[PARTNER].in_flight == 0
