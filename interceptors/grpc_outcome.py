"""What a gRPC attempt's status means to the attempt loop, and the CallError its caller sees.

Shared by the aio and the sync adapter: the code, the pushback (``grpc-retry-pushback-ms``),
the RetryInfo delay and a TLS handshake failure are read off a failed call here, once, and
every way a call can end without an answer becomes one CallError naming target, method,
attempts and the reason the loop stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc import aio

from interceptors.breaker import CallRefused, ConcurrencyLimited
from interceptors.errors import (
    PUSHBACK_KEY,
    CallError,
    circuit_open_error,
    concurrency_limited_error,
    retry_delay_of,
    status_from_metadata,
)
from interceptors.retry import AttemptFailure
from interceptors.runtime import ChainRuntime
from interceptors.tls import grpc_tls_problem, tls_handshake_error

#: Metadata key gRPC's own retries send with the number of earlier attempts.
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"


def attempt_failure(
    code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]] | None
) -> AttemptFailure:
    """The core's view of a failed attempt: code, pushback, RetryInfo, TLS handshake failure."""
    pushback: int | None = None
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                pushback = int(text)
            except ValueError:
                pushback = -1  # unreadable pushback: gRPC treats it as "do not retry"
    delay = retry_delay_of(status_from_metadata(code, details, tuple(trailing or ())))
    return AttemptFailure(
        code=code.name,
        pushback_ms=pushback,
        retry_delay_s=delay,
        tls_problem=grpc_tls_problem(code, details),
        detail=details,
    )


class GrpcOutcomes:
    """What a gRPC attempt's status means, and the CallError a caller sees (aio and sync)."""

    __slots__ = ("method", "runtime", "target")

    def __init__(self, runtime: ChainRuntime, target: str, method: str) -> None:
        self.runtime = runtime
        self.target = target
        self.method = method

    def classify(self, error: BaseException) -> AttemptFailure | None:
        if not isinstance(error, aio.AioRpcError | grpc.Call):  # a sync failure is a Call too
            return None
        return attempt_failure(error.code(), error.details() or "", error.trailing_metadata())

    def answer_code(self, result: Any) -> str:
        return "OK"

    def deadline_exhausted(self, problem: str) -> BaseException:
        return CallError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            problem,
            target=self.target,
            method=self.method,
            attempts=0,
            stop_reason="deadline",
        )

    def refused(self, refusal: CallRefused, attempts: int) -> BaseException:
        runtime, target, method = self.runtime, self.target, self.method
        if isinstance(refusal, ConcurrencyLimited):
            return concurrency_limited_error(
                caller=runtime.caller,
                target=target,
                method=method,
                limit=refusal.limit,
                retry_after_s=refusal.retry_after_s,
                attempts=attempts,
            )
        error = circuit_open_error(
            caller=runtime.caller,
            target=target,
            method=method,
            retry_after_s=refusal.retry_after_s,
        )
        error.attempts = attempts
        return error

    def aborted(self, attempts: int, open_s: float) -> BaseException:
        error = circuit_open_error(
            caller=self.runtime.caller,
            target=self.target,
            method=self.method,
            retry_after_s=open_s,
            in_flight=True,
        )
        error.attempts = attempts
        return error

    def gave_up(
        self, failure: AttemptFailure, error: BaseException, attempts: int, reason: str
    ) -> BaseException:
        if failure.tls_problem is not None:
            return tls_handshake_error(
                self.runtime,
                target=self.target,
                method=self.method,
                problem=failure.tls_problem,
                attempts=attempts,
            )
        trailing = (
            error.trailing_metadata() if isinstance(error, aio.AioRpcError | grpc.Call) else None
        )
        return CallError(
            grpc.StatusCode[failure.code],
            failure.detail,
            target=self.target,
            method=self.method,
            attempts=attempts,
            stop_reason=reason,
            trailing_metadata=trailing
            if isinstance(trailing, aio.Metadata)
            else aio.Metadata.from_tuple(tuple(trailing or ())),
        )
