"""The HTTP partner adapter: aiohttp makes one attempt, the core's loop does the rest.

Retried only when safe (GET, HEAD, PUT, DELETE, OPTIONS, or an ``Idempotency-Key``), through
the same loop as gRPC calls (``attempts.run_call``): one breaker and one budget per partner,
the same counters and spans. HTTP statuses map onto gRPC's code names (``codes.http_code``),
so the core's rules apply unchanged; ``[methods]`` policy names a route like a method
(``/<partner>/<VERB> <path>``, see :func:`route_of`). Each partner has one aiohttp session: a
keep-alive connection pool, TLS for ``https`` URLs, the attempt's share of the deadline as its
timeout, and a bound on the answer's size. A failed TLS handshake (untrusted or expired
certificate) is never retried nor counted by the breaker, as in the gRPC chain.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import re
import ssl
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode

import aiohttp
import grpc
from opentelemetry.trace import SpanKind

from interceptors.attempts import Attempt, Call, run_call
from interceptors.breaker import CallRefused, ConcurrencyLimited
from interceptors.codes import http_code
from interceptors.errors import PartnerCallError, circuit_open_error, concurrency_limited_error
from interceptors.policy import partner_route
from interceptors.retry import AttemptFailure
from interceptors.runtime import ChainRuntime
from interceptors.tls import ssl_tls_problem, tls_handshake_error
from interceptors.tracing import TARGET_ATTRIBUTE, TraceFields

__all__ = ["SAFE_METHODS", "PartnerClient", "PartnerResponse", "route_of"]

SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Largest answer body read from a partner (gRPC's default receive limit): beyond, the
#: attempt fails RESOURCE_EXHAUSTED, as a gRPC call receiving too large a message does.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Idle keep-alive connections are closed after this many seconds: below the idle timeout of
#: common servers (5 s and up; the sandbox's 10 s), so a connection the partner is closing is
#: never picked for a request that cannot be retried.
KEEPALIVE_S = 4.0
#: HTTP statuses that are failed attempts, not answers: the loop may retry them.
_FAILED_STATUSES = frozenset({408, 429})
#: Writes each attempt's ``traceparent`` (directly in the common case, as the gRPC chain does).
_TRACE_FIELDS = TraceFields()
_ID_SEGMENT = re.compile(r"^(?!v\d+$).*\d")


def route_of(path: str) -> str:
    """The route of a request path: its query dropped, id-like segments (with a digit, but
    not a version like ``v2``) as ``:id``. ``/charges/ch_42/refunds?x=1`` is
    ``/charges/:id/refunds``; metrics label partner calls by it too."""
    segments = [":id" if _ID_SEGMENT.match(s) else s for s in path.split("?", 1)[0].split("/")]
    return "/".join(segments)


class PartnerResponse(NamedTuple):
    """A partner's answer below 5xx: its HTTP status and decoded body (unpacks as a pair)."""

    status: int
    """HTTP status code."""
    body: Any
    """Decoded JSON when the answer is JSON, else the raw bytes."""


class ResponseTooLarge(Exception):
    """The partner's answer is larger than the client reads."""


class _Response(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes


class _FailedAnswer(Exception):
    """A 5xx, 408 or 429: an attempt that failed, with the answer that says how."""

    def __init__(self, response: _Response) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response


def _tls_problem(error: BaseException) -> str | None:
    """The complaint of a TLS handshake that failed for a reason a retry cannot fix."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        cause = error.certificate_error
        return ssl_tls_problem(cause) if isinstance(cause, ssl.SSLError) else str(cause)
    if isinstance(error, aiohttp.ClientSSLError) and isinstance(error.os_error, ssl.SSLError):
        return ssl_tls_problem(error.os_error)
    return None


class _Exchange:
    """One partner request's attempts (the loop's transport)."""

    def __init__(
        self, client: PartnerClient, verb: str, path: str, body: bytes, headers: dict[str, str]
    ) -> None:
        self.client = client
        self.verb, self.path, self.body, self.headers = verb, path, body, headers
        self.name = f"{verb} {path}"

    async def attempt(self, attempt: Attempt) -> _Response:
        sent = dict(self.headers)
        if attempt.number > 1:
            sent["X-Previous-Attempts"] = str(attempt.number - 1)
        if attempt.trace_context is not None:
            _TRACE_FIELDS.inject(sent, attempt.trace_context)
        # Its own task, so an opening breaker can fail it without cancelling the caller.
        exchange = asyncio.ensure_future(
            self.client.send(self.verb, self.path, sent, self.body, attempt.timeout_s)
        )
        attempt.attach(exchange)
        response = await exchange
        if attempt.span is not None:
            attempt.span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500 or response.status in _FAILED_STATUSES:
            raise _FailedAnswer(response)
        return response

    async def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        return None  # the pool reconnects by itself

    def classify(self, error: BaseException) -> AttemptFailure | None:
        if isinstance(error, _FailedAnswer):
            return self._failed_answer(error.response)
        problem = _tls_problem(error)
        if problem is not None:
            return AttemptFailure(
                code="UNAVAILABLE", detail=f"TLS handshake failed: {problem}", tls_problem=problem
            )
        if isinstance(error, TimeoutError):
            return AttemptFailure(code="DEADLINE_EXCEEDED", detail="no answer within the deadline")
        if isinstance(error, ResponseTooLarge):
            return AttemptFailure(code="RESOURCE_EXHAUSTED", detail=str(error))
        if isinstance(error, aiohttp.ClientError | OSError | ValueError):
            return AttemptFailure(code="UNAVAILABLE", detail=f"{type(error).__name__}: {error}")
        return None

    @staticmethod
    def _failed_answer(response: _Response) -> AttemptFailure:
        pushback = None
        if "retry-after" in response.headers:
            try:
                pushback = int(float(response.headers["retry-after"]) * 1000)
            except ValueError:
                pushback = None  # an HTTP date: fall back to our own backoff
        return AttemptFailure(
            code=http_code(response.status),
            pushback_ms=pushback,
            detail=f"HTTP {response.status}",
        )

    def answer_code(self, result: _Response) -> str:
        return http_code(result.status)

    def _error(
        self, code: str, detail: str, attempts: int, reason: str, **fields: Any
    ) -> PartnerCallError:
        partner = self.client.partner
        return PartnerCallError(
            grpc.StatusCode[code],
            f"{partner}: {detail}",
            http_status=fields.pop("http_status", None),
            target=partner,
            method=self.name,
            attempts=attempts,
            stop_reason=reason,
            **fields,
        )

    def deadline_exhausted(self, problem: str) -> BaseException:
        return self._error("DEADLINE_EXCEEDED", problem, 0, "deadline")

    def refused(self, refusal: CallRefused, attempts: int) -> BaseException:
        runtime, partner = self.client.runtime, self.client.partner
        if isinstance(refusal, ConcurrencyLimited):
            return concurrency_limited_error(
                caller=runtime.caller,
                target=partner,
                method=self.name,
                limit=refusal.limit,
                retry_after_s=refusal.retry_after_s,
                attempts=attempts,
                http=True,
            )
        local = circuit_open_error(
            caller=runtime.caller,
            target=partner,
            method=self.name,
            retry_after_s=refusal.retry_after_s,
        )
        return self._error(
            "UNAVAILABLE",
            str(refusal),
            attempts,
            "breaker_open",
            trailing_metadata=local.trailing_metadata(),
        )

    def aborted(self, attempts: int, open_s: float) -> BaseException:
        partner = self.client.partner
        detail = f"circuit breaker of {partner} opened while the call was in flight"
        return self._error("UNAVAILABLE", detail, attempts, "breaker_open")

    def gave_up(
        self, failure: AttemptFailure, error: BaseException, attempts: int, reason: str
    ) -> BaseException:
        if failure.tls_problem is not None:
            return tls_handshake_error(
                self.client.runtime,
                target=self.client.partner,
                method=self.name,
                problem=failure.tls_problem,
                attempts=attempts,
                http=True,
            )
        status = error.response.status if isinstance(error, _FailedAnswer) else None
        return self._error(failure.code, failure.detail, attempts, reason, http_status=status)


class PartnerClient:
    """Calls one HTTP partner through the chain; ``request`` returns a PartnerResponse.

    A response below 500 (429 and 408 apart) is an answer and is returned, whatever its status;
    a 5xx, 429, 408, a connection failure, a timeout, an oversized answer or an open breaker
    that the chain gives up on raises PartnerCallError (a CallError) naming partner, attempts
    and why it stopped. ``aclose`` closes its connection pool (the client factory does it at
    shutdown).
    """

    def __init__(
        self,
        runtime: ChainRuntime,
        partner: str,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.runtime = runtime
        self.partner = partner
        self.base_url = base_url.rstrip("/")
        self.max_response_bytes = max_response_bytes
        self._ssl_context = ssl_context
        """Trust and identity of ``https`` requests; None: the system's trust store."""
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _tls(self) -> ssl.SSLContext | bool:
        """The TLS context of a request to the partner (True: none needed, plain ``http``)."""
        if not self.base_url.startswith("https:"):
            return True
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # made once: it reads the store
        return self._ssl_context

    def _pool(self) -> aiohttp.ClientSession:
        """The partner's session (its keep-alive pool), made on first use in this loop."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._session_loop is not loop:
            # As many connections as the breaker lets attempts be in flight: none queues here.
            limit = self.runtime.config.target_policy(self.partner).breaker.max_concurrent_calls
            connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=KEEPALIVE_S)
            # No cookie jar: a partner's cookie from one merchant's request must not ride on
            # the next merchant's (and the jar's bookkeeping costs CPU on every request).
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._session, self._session_loop = session, loop
        return session

    async def aclose(self) -> None:
        """Close the connection pool; a later request opens a new one."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def send(
        self, verb: str, path: str, headers: dict[str, str], body: bytes, timeout_s: float
    ) -> _Response:
        """One HTTP exchange within ``timeout_s``, its answer read whole (up to the limit)."""
        limit = self.max_response_bytes
        async with self._pool().request(
            verb,
            self.base_url + path,
            headers=headers,
            data=body or None,
            ssl=self._tls(),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            declared = response.content_length
            if declared is not None and declared > limit:
                raise ResponseTooLarge(f"answer of {declared} bytes exceeds the {limit}-byte limit")
            payload = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                payload += chunk
                if len(payload) > limit:
                    raise ResponseTooLarge(f"answer exceeds the {limit}-byte limit")
            headers_read = {k.lower(): v for k, v in response.headers.items()}
            return _Response(response.status, headers_read, bytes(payload))

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
        route: str | None = None,
    ) -> PartnerResponse:
        """Send one request (retried when safe); the body is decoded JSON when it is JSON.

        ``route`` names the request in ``[methods]`` policy (``/<partner>/<VERB> <route>``);
        by default :func:`route_of` the path. One CLIENT span per request, one child per
        attempt (its ``traceparent`` sent along).
        """
        method = method.upper()
        sent = dict(headers or {})
        body = b""
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent["Content-Type"] = "application/json"
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        route_path = route or route_of(path)
        if query:
            path = f"{path}?{urlencode(query)}"
        exchange = _Exchange(self, method, path, body, sent)
        call = Call(
            target=self.partner,
            method=exchange.name,
            route=partner_route(self.partner, method, route_path),
            safe=method in SAFE_METHODS or bool(idempotency_key),
            timeout_s=timeout_s or None,
            attempt_name=f"{method} {self.partner} attempt",
            rpc_system="http",
        )
        runtime = self.runtime
        if not runtime.trace_calls:
            response = await run_call(exchange, call, runtime)
        else:
            with runtime.tracer.start_as_current_span(
                f"{method} {self.partner}",
                kind=SpanKind.CLIENT,
                attributes={
                    TARGET_ATTRIBUTE: self.partner,
                    "http.request.method": method,
                    "url.full": self.base_url + path,
                },
                record_exception=False,
                set_status_on_exception=False,
            ):
                response = await run_call(exchange, call, runtime)
        return PartnerResponse(response.status, _decode(response))


def _decode(response: _Response) -> Any:
    if "json" in response.headers.get("content-type", "") and response.body:
        return jsonlib.loads(response.body)
    return response.body
