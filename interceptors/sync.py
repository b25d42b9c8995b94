"""The sync adapter (scripts and tools): one grpc-interceptor ClientInterceptor over the same loop.

For ``grpc.intercept_channel(channel, *chain.sync_interceptors(target))``. A sync
continuation *returns* a failed call instead of raising it; an attempt here raises it, so the
core's loop (``attempts.run_call_sync``) sees failures as the aio adapter's do. A blocking
attempt cannot be failed from outside: one in flight when the breaker opens waits for its
answer or its deadline. Retry and breaker act on unary-unary calls only; streams get the
deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_interceptor import ClientCallDetails, ClientInterceptor

from interceptors.attempts import Attempt, Call, run_call_sync, stream_timeout
from interceptors.deadline import DeadlineExhausted
from interceptors.grpc_outcome import PREVIOUS_ATTEMPTS_KEY, GrpcOutcomes
from interceptors.retry import AttemptFailure
from interceptors.runtime import ChainRuntime
from interceptors.safety import method_name, request_is_safe
from interceptors.tracing import inject, propagation_fields

Method = Callable[[Any, grpc.ClientCallDetails], Any]


def _details(details: grpc.ClientCallDetails, **changes: Any) -> ClientCallDetails:
    fields: dict[str, Any] = {
        "method": details.method,
        "timeout": details.timeout,
        "metadata": details.metadata,
        "credentials": details.credentials,
        "wait_for_ready": details.wait_for_ready,
        "compression": getattr(details, "compression", None),
    }
    fields.update(changes)
    return ClientCallDetails(**fields)


class SyncAttempts(GrpcOutcomes):
    """One unary call's attempts on a sync channel (the loop's transport)."""

    def __init__(
        self,
        runtime: ChainRuntime,
        target: str,
        method: Method,
        request: Any,
        details: grpc.ClientCallDetails,
        dropped_keys: frozenset[str],
    ) -> None:
        super().__init__(runtime, target, method_name(details.method))
        self._method = method
        self._request = request
        self._details = details
        self._base = tuple((k, v) for k, v in (details.metadata or ()) if k not in dropped_keys)
        self._wait_for_ready = details.wait_for_ready

    def attempt(self, attempt: Attempt) -> Any:
        added: dict[str, str] = {}
        if attempt.number > 1:
            added[PREVIOUS_ATTEMPTS_KEY] = str(attempt.number - 1)
        if attempt.trace_context is not None:
            inject(added, attempt.trace_context)
        wait = self._wait_for_ready
        outcome = self._method(
            self._request,
            _details(
                self._details,
                timeout=attempt.timeout_s,
                metadata=(*self._base, *added.items()),
                wait_for_ready=attempt.policy.wait_for_ready if wait is None else wait,
            ),
        )
        if isinstance(outcome, BaseException):  # a failed call, returned
            raise outcome
        return outcome

    def before_retry(self, failure: AttemptFailure, left_s: float) -> None:
        if failure.code == "UNAVAILABLE":
            self._wait_for_ready = True  # wait out grpcio's reconnect backoff, within the deadline


class SyncPolicyInterceptor(ClientInterceptor):
    """Every unary call of one target's sync channel goes through the attempt loop."""

    def __init__(self, runtime: ChainRuntime, target: str) -> None:
        self.runtime = runtime
        self.target = target
        self._dropped = propagation_fields() | {PREVIOUS_ATTEMPTS_KEY}

    def intercept(self, method: Method, request: Any, call_details: grpc.ClientCallDetails) -> Any:
        transport = SyncAttempts(
            self.runtime, self.target, method, request, call_details, self._dropped
        )
        name = transport.method
        call = Call(
            target=self.target,
            method=name,
            safe=request_is_safe(name, request),
            timeout_s=call_details.timeout,
            attempt_name=name.lstrip("/") + " attempt",
        )
        return run_call_sync(transport, call, self.runtime)

    # Streams bypass retry and breaker: replaying a stream is not safe once messages flowed.
    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._stream_details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(details, requests)

    def _stream_details(self, details: grpc.ClientCallDetails) -> ClientCallDetails:
        runtime, name = self.runtime, method_name(details.method)
        try:
            timeout = stream_timeout(runtime, self.target, name, details.timeout)
        except DeadlineExhausted as exc:
            raise GrpcOutcomes(runtime, self.target, name).deadline_exhausted(str(exc)) from None
        wait = details.wait_for_ready
        if wait is None:
            wait = runtime.policy(self.target, name).wait_for_ready
        return _details(details, timeout=timeout, wait_for_ready=wait)


def sync_chain(runtime: ChainRuntime, target: str) -> list[ClientInterceptor]:
    """The interceptors of one target's sync channel."""
    return [SyncPolicyInterceptor(runtime, target)]
