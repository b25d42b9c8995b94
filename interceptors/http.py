"""The HTTP partner wrapper: partner calls go through the same deadline, retry and breaker core.

Retried only when safe (GET, HEAD, PUT, DELETE, OPTIONS, or an ``Idempotency-Key``); one
breaker and one budget per partner. HTTP statuses map onto gRPC's code names so the core
rules apply unchanged. Spans as in the gRPC chain: one per request, one child per attempt,
whose ``traceparent`` header the attempt sends. A small HTTP/1.1 client over asyncio streams
keeps it stdlib-only and cancellable (a thread running http.client cannot be cancelled).
A failed TLS handshake (untrusted or expired certificate) is never retried nor counted by
the breaker, as in the gRPC chain.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from interceptors.breaker import BreakerOpen, ConcurrencyLimited, Outcome
from interceptors.deadline import DeadlineExhausted, outgoing_deadline
from interceptors.errors import PartnerCallError, concurrency_limited_error
from interceptors.retry import AttemptFailure, RetryRun, breaker_outcome
from interceptors.runtime import AbortableAttempt, ChainRuntime
from interceptors.telemetry import CallRecord
from interceptors.tls import ssl_tls_problem, tls_handshake_error
from interceptors.tracing import (
    TARGET_ATTRIBUTE,
    circuit_open,
    fail_span,
    inject,
    start_attempt,
    stopped,
)

SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def http_code(status: int) -> str:
    """gRPC code name of an HTTP status (the mapping of google.rpc.Code)."""
    if 200 <= status < 300:
        return "OK"
    return _CODES.get(status, "FAILED_PRECONDITION" if status < 500 else "UNKNOWN")


class PartnerResponse(NamedTuple):
    """A partner's answer below 5xx: its HTTP status and decoded body (unpacks as a pair)."""

    status: int
    """HTTP status code."""
    body: Any
    """Decoded JSON when the answer is JSON, else the raw bytes."""


class _Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class _TlsHandshakeFailed(Exception):
    """The partner's TLS handshake failed for a reason a retry cannot fix."""


async def _exchange(
    url: str, method: str, headers: dict[str, str], body: bytes, context: ssl.SSLContext | None
) -> _Response:
    parts = urlsplit(url)
    port = parts.port or (443 if context is not None else 80)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
    except ssl.SSLError as exc:  # the handshake completes inside open_connection
        problem = ssl_tls_problem(exc)
        if problem is None:
            raise
        raise _TlsHandshakeFailed(problem) from exc
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1")
        status = int(status_line.split()[1])
        received: dict[str, str] = {}
        while (line := (await reader.readline()).decode("latin-1").strip()) != "":
            key, _, value = line.partition(":")
            received[key.strip().lower()] = value.strip()
        if received.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray()
            while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                data += await reader.readexactly(size)
                await reader.readline()
            payload = bytes(data)
        elif "content-length" in received:
            payload = await reader.readexactly(int(received["content-length"]))
        else:
            payload = await reader.read()
        return _Response(status, received, payload)
    finally:
        writer.close()


class PartnerClient:
    """Calls one HTTP partner through the chain; ``request`` returns a PartnerResponse.

    A response below 500 (429 and 408 apart) is an answer and is returned, whatever its status;
    a 5xx, 429, 408, a connection failure, a timeout or an open breaker that the chain gives up
    on raises PartnerCallError (a CallError) naming partner, attempts and why it stopped.
    """

    def __init__(
        self,
        runtime: ChainRuntime,
        partner: str,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.runtime = runtime
        self.partner = partner
        self.base_url = base_url.rstrip("/")
        self._ssl_context = ssl_context
        """Trust and identity of ``https`` requests; None: the system's trust store."""

    def _tls(self) -> ssl.SSLContext | None:
        """The TLS context of a request to the partner, None for plain ``http``."""
        if not self.base_url.startswith("https:"):
            return None
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # made once: it reads the store
        return self._ssl_context

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        query: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> PartnerResponse:
        """Send one request (retried when safe); the body is decoded JSON when it is JSON.

        One CLIENT span per request, one child per attempt (its ``traceparent`` sent along).
        """
        method = method.upper()
        if query:
            path = f"{path}?{urlencode(query)}"
        with self.runtime.tracer.start_as_current_span(
            f"{method} {self.partner}",
            kind=SpanKind.CLIENT,
            attributes={
                TARGET_ATTRIBUTE: self.partner,
                "http.request.method": method,
                "url.full": self.base_url + path,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._request(
                    method,
                    path,
                    json=json,
                    idempotency_key=idempotency_key,
                    timeout_s=timeout_s,
                    headers=headers,
                )
            except PartnerCallError as err:
                fail_span(span, err.code().name, err.details() or "", None)
                stopped(span, attempts=err.attempts, reason=err.stop_reason)
                raise

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        idempotency_key: str | None,
        timeout_s: float | None,
        headers: dict[str, str] | None,
    ) -> PartnerResponse:
        runtime, name = self.runtime, f"{method} {path}"
        started = runtime.clock()
        policy = runtime.config.target_policy(self.partner)
        try:
            deadline = outgoing_deadline(
                timeout_s or policy.timeout_s,
                margin_s=policy.deadline_margin_s,
                clock=runtime.clock,
            )
        except DeadlineExhausted as exc:
            raise self._error("DEADLINE_EXCEEDED", str(exc), 0, "deadline", None, name) from None
        sent = dict(headers or {})
        body = b""
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent["Content-Type"] = "application/json"
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        run = RetryRun(
            policy=policy.retry,
            safe=method in SAFE_METHODS or bool(idempotency_key),
            deadline_at=runtime.clock() + deadline.timeout_s,
            budget=runtime.budget(self.partner),
            clock=runtime.clock,
            rng=runtime.rng,
        )
        breaker = runtime.breakers.get(self.partner)
        while True:
            attempt = AbortableAttempt(asyncio.get_running_loop())
            try:
                permit = breaker.admit(attempt.abort)
            except ConcurrencyLimited as exc:
                self._record(name, "UNAVAILABLE", started, str(exc))
                runtime.telemetry.inc("concurrency_limited_total", target=self.partner)
                runtime.telemetry.inc(
                    "retry_stops_total",
                    target=self.partner,
                    method=name,
                    reason="concurrency_limited",
                )
                raise concurrency_limited_error(
                    caller=runtime.caller,
                    target=self.partner,
                    method=name,
                    limit=exc.limit,
                    retry_after_s=exc.retry_after_s,
                    attempts=run.attempts,
                    http=True,
                ) from None
            except BreakerOpen as exc:
                circuit_open(
                    trace.get_current_span(), target=self.partner, retry_after_s=exc.retry_after_s
                )
                # Counted like the gRPC chain counts a rejected call: a failed call, stopped.
                self._record(name, "UNAVAILABLE", started, str(exc))
                runtime.telemetry.inc(
                    "retry_stops_total", target=self.partner, method=name, reason="breaker_open"
                )
                raise self._error(
                    "UNAVAILABLE", str(exc), run.attempts, "breaker_open", None, name
                ) from None
            left = run.start_attempt()
            runtime.telemetry.inc("attempts_total", target=self.partner, method=name)
            if run.attempts > 1:
                sent["X-Previous-Attempts"] = str(run.attempts - 1)
            span = start_attempt(
                runtime.tracer,
                f"{method} {self.partner} attempt",
                target=self.partner,
                attempt=run.attempts,
            )
            inject(sent, trace.set_span_in_context(span))
            response, detail, tls_problem = None, "", None
            try:
                exchange = asyncio.ensure_future(
                    _exchange(self.base_url + path, method, sent, body, self._tls())
                )
                attempt.attach(exchange)
                response = await asyncio.wait_for(exchange, timeout=max(left, 0.0))
                code, detail = http_code(response.status), f"HTTP {response.status}"
            except _TlsHandshakeFailed as exc:
                code, detail = "UNAVAILABLE", f"TLS handshake failed: {exc}"
                tls_problem = str(exc)
            except TimeoutError:
                code, detail = "DEADLINE_EXCEEDED", "no answer within the deadline"
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                code, detail = "UNAVAILABLE", f"{type(exc).__name__}: {exc}"
            except asyncio.CancelledError:
                breaker.record(permit, Outcome.IGNORED)  # says nothing of the partner
                if not attempt.caused():
                    span.end()
                    raise  # the caller cancelled
                raise self._aborted(span, name, started, run.attempts) from None
            except BaseException:
                breaker.record(permit, Outcome.IGNORED)  # says nothing of the partner
                span.end()
                raise
            breaker.record(
                permit,
                breaker_outcome(
                    code,
                    tls_failed=tls_problem is not None,
                    deadline_was_callers=deadline.propagated,
                ),
            )
            _end_attempt(span, code, detail, response)
            if response is not None and (
                response.status < 500 and response.status not in (408, 429)
            ):
                self._record(name, code, started, "")
                return PartnerResponse(response.status, _decode(response))
            decision = run.after_failure(self._failure(code, response, tls_problem))
            if not decision.retry:
                reason = decision.stop_reason or "not_retryable"
                self._record(name, code, started, detail)
                runtime.telemetry.inc(
                    "retry_stops_total", target=self.partner, method=name, reason=reason
                )
                if tls_problem is not None:
                    raise tls_handshake_error(
                        runtime,
                        target=self.partner,
                        method=name,
                        problem=tls_problem,
                        attempts=run.attempts,
                        http=True,
                    )
                status = response.status if response is not None else None
                raise self._error(code, detail, run.attempts, reason, status, name)
            runtime.telemetry.inc("retries_total", target=self.partner, method=name)
            await runtime.sleep(decision.delay_s)

    def _aborted(
        self, span: trace.Span, name: str, started: float, attempts: int
    ) -> PartnerCallError:
        """The error of an attempt failed in flight because the breaker opened meanwhile."""
        runtime = self.runtime
        detail = f"circuit breaker of {self.partner} opened while the call was in flight"
        runtime.telemetry.inc("breaker_aborted_total", target=self.partner)
        open_s = runtime.breakers.get(self.partner).policy.open_s
        circuit_open(span, target=self.partner, retry_after_s=open_s)
        _end_attempt(span, "UNAVAILABLE", detail, None)
        self._record(name, "UNAVAILABLE", started, detail)
        runtime.telemetry.inc(
            "retry_stops_total", target=self.partner, method=name, reason="breaker_open"
        )
        return self._error("UNAVAILABLE", detail, attempts, "breaker_open", None, name)

    def _record(self, name: str, code: str, started: float, error: str) -> None:
        self.runtime.telemetry.record_call(
            CallRecord(
                target=self.partner,
                method=name,
                code=code,
                duration_s=self.runtime.clock() - started,
                error=error,
            )
        )

    def _failure(
        self, code: str, response: _Response | None, tls_problem: str | None
    ) -> AttemptFailure:
        pushback = None
        if response is not None and "retry-after" in response.headers:
            try:
                pushback = int(float(response.headers["retry-after"]) * 1000)
            except ValueError:
                pushback = None  # an HTTP date: fall back to our own backoff
        return AttemptFailure(code=code, pushback_ms=pushback, tls_problem=tls_problem)

    def _error(
        self, code: str, detail: str, attempts: int, reason: str, status: int | None, name: str
    ) -> PartnerCallError:
        return PartnerCallError(
            grpc.StatusCode[code],
            f"{self.partner}: {detail}",
            http_status=status,
            target=self.partner,
            method=name,
            attempts=attempts,
            stop_reason=reason,
        )


def _end_attempt(span: trace.Span, code: str, detail: str, response: _Response | None) -> None:
    if response is not None:
        span.set_attribute("http.response.status_code", response.status)
    if response is None or response.status >= 500 or response.status in (408, 429):
        fail_span(span, code, detail, None)
    span.end()


def _decode(response: _Response) -> Any:
    if "json" in response.headers.get("content-type", "") and response.body:
        return jsonlib.loads(response.body)
    return response.body
