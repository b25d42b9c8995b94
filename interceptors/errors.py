"""Domain errors that servicers raise, and how each becomes a gRPC status.

A servicer raises one of these; the server interceptor turns it into a status with exactly
one google.rpc.ErrorInfo (stable ``reason``, ``domain`` = the service) and, for bad input,
google.rpc.BadRequest field violations. Nothing else reaches a caller, never a traceback,
and every part of a status is cut to a bound, so no input can be echoed back whole.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from interceptors.retry import StopReason

#: Trailing metadata key of gRPC's retry pushback; ``-1`` tells a caller not to retry.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Bounds of what a status carries, so that no path can echo a huge input into trailers: a
# gRPC client may refuse trailers above 8 KiB and always refuses them above 16 KiB (it then
# sees RESOURCE_EXHAUSTED, not our status). The message travels twice (grpc-message,
# percent-encoded, and inside the details), hence the budget: at most about 7 KiB in all.
#: UTF-8 bytes of a status message.
MAX_MESSAGE_BYTES = 1024
#: ErrorInfo metadata entries kept, and UTF-8 bytes of each key and value.
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 256
#: BadRequest field violations kept, and UTF-8 bytes of each field path and description.
MAX_FIELD_VIOLATIONS = 16
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 512
#: Serialized google.rpc.Status; field violations, then metadata entries, are dropped from
#: the end until it fits.
MAX_STATUS_BYTES = 3072


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request."""

    field: str
    """Path of the field (``amount.amount_minor``)."""
    description: str
    """Why it is bad, in words a caller can act on."""


class ServiceError(Exception):
    """Base of every error a servicer raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay_s: float | None = None,
        pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        self.pushback_ms = pushback_ms


class InvalidArgument(ServiceError):
    """The request is malformed; repeating it unchanged can never succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "VALIDATION_FAILED"


class NotFound(ServiceError):
    """A named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The resource the request would create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The system is not in a state the request needs (refund above captured, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    """The caller's credentials are missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "API_KEY_INVALID"


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class OutOfRange(ServiceError):
    """A value is past the range the operation accepts."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Aborted(ServiceError):
    """A concurrent operation conflicts; the caller may retry with the same idempotency key."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(ServiceError):
    """A quota or capacity is used up."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """This service cannot serve now (a dependency is down, the process is stopping)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


def truncated(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else a prefix that does plus its length."""
    data = text.encode()
    if len(data) <= limit:
        return text
    mark = f"…({len(text)} chars)"
    room = max(limit - len(mark.encode()), 0)
    return data[:room].decode(errors="ignore") + mark


def _packed(
    message: error_details_pb2.ErrorInfo
    | error_details_pb2.BadRequest
    | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    *,
    domain: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[FieldViolation] = (),
    retry_delay_s: float | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status with exactly one ErrorInfo and the optional details.

    Every part is cut to the ``MAX_*`` bounds above, whatever the caller put in it.
    """
    bounded = {
        truncated(key, MAX_METADATA_KEY_BYTES): truncated(value, MAX_METADATA_VALUE_BYTES)
        for key, value in list((metadata or {}).items())[:MAX_METADATA_ENTRIES]
    }
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=truncated(v.field, MAX_FIELD_BYTES),
            description=truncated(v.description, MAX_DESCRIPTION_BYTES),
        )
        for v in field_violations[:MAX_FIELD_VIOLATIONS]
    ]
    message = truncated(message, MAX_MESSAGE_BYTES)
    while True:
        details = [
            _packed(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=bounded))
        ]
        if violations:
            details.append(_packed(error_details_pb2.BadRequest(field_violations=violations)))
        if retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(retry_delay_s * 1e9))
            details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(code=code.value[0], message=message, details=details)
        if status.ByteSize() <= MAX_STATUS_BYTES or not (violations or bounded):
            return status
        if violations:
            violations.pop()
        else:
            bounded.popitem()


def service_error_status(exc: ServiceError, *, domain: str) -> status_pb2.Status:
    """The rich status of a domain error raised by a servicer of ``domain``."""
    return rich_status(
        exc.code,
        exc.message,
        domain=domain,
        reason=exc.reason,
        metadata=exc.metadata,
        field_violations=exc.field_violations,
        retry_delay_s=exc.retry_delay_s,
    )


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status."""
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a status, if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def status_from_metadata(
    code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str | bytes]] | None
) -> status_pb2.Status:
    """The google.rpc.Status a peer sent in ``grpc-status-details-bin``, else a bare one."""
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return status
    return status_pb2.Status(code=code.value[0], message=message)


__all__ = [
    "MAX_DESCRIPTION_BYTES",
    "MAX_FIELD_BYTES",
    "MAX_FIELD_VIOLATIONS",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_BYTES",
    "MAX_METADATA_VALUE_BYTES",
    "MAX_STATUS_BYTES",
    "PUSHBACK_KEY",
    "STATUS_DETAILS_KEY",
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_info",
    "rich_status",
    "service_error_status",
    "status_code",
    "status_from_metadata",
    "truncated",
]


# --- What a client call raises when the policy chain gives up ---------------------------------

#: Why the chain stopped trying, as the core names it (``interceptors.retry.StopReason``).
STOP_REASONS = frozenset(get_args(StopReason))
#: ErrorInfo reason of a call refused locally by an open circuit breaker.
CIRCUIT_OPEN_REASON = "CIRCUIT_OPEN"
#: ErrorInfo reason of a call refused locally: its target's limit of calls in flight was reached.
CONCURRENCY_LIMITED_REASON = "CONCURRENCY_LIMITED"


class CallError(aio.AioRpcError):
    """A call the chain gave up on: the last status plus who, what, how often and why it stopped.

    It is an ``AioRpcError`` so ``code()``, ``details()`` and ``trailing_metadata()`` work as on
    any failed call, and a servicer letting it escape is mapped by the server interceptor to
    UNAVAILABLE with pushback ``-1`` (retry in one layer only).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        target: str,
        method: str,
        attempts: int,
        stop_reason: str,
        initial_metadata: aio.Metadata | None = None,
        trailing_metadata: aio.Metadata | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        if stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {stop_reason!r}")
        super().__init__(
            code,
            initial_metadata or aio.Metadata(),
            trailing_metadata or aio.Metadata(),
            details,
            debug_error_string,
        )
        self.target = target
        self.method = method
        self.attempts = attempts
        self.stop_reason = stop_reason

    def __str__(self) -> str:
        return (
            f"{self.method} on {self.target} failed with {self.code().name} after "
            f"{self.attempts} attempt(s), stopped: {self.stop_reason}: {self.details()}"
        )

    __repr__ = __str__


class PartnerCallError(CallError):
    """A call to an HTTP partner the chain gave up on; ``http_status`` is None when none came."""

    def __init__(
        self, code: grpc.StatusCode, details: str, *, http_status: int | None, **kw: Any
    ) -> None:
        super().__init__(code, details, **kw)
        self.http_status = http_status


@functools.lru_cache(maxsize=4096)
def _circuit_open_details(caller: str, target: str, method: str) -> bytes:
    """The serialized status detail of an open breaker's refusal (the same every time)."""
    status = rich_status(
        grpc.StatusCode.UNAVAILABLE,
        f"circuit breaker of {target} is open",
        domain=caller,
        reason=CIRCUIT_OPEN_REASON,
        metadata={"target": target, "method": method},
    )
    serialized: bytes = status.SerializeToString()
    return serialized


def circuit_open_error(
    *, caller: str, target: str, method: str, retry_after_s: float, in_flight: bool = False
) -> CallError:
    """An open breaker's local refusal: UNAVAILABLE, ErrorInfo CIRCUIT_OPEN naming the target.

    ``in_flight``: the attempt was sent, and failed when the breaker opened while it waited
    (``attempts`` is then 1, else 0: nothing was sent).
    """
    message = (
        f"circuit breaker of {target} opened while the call was in flight; not waiting for it"
        if in_flight
        else f"circuit breaker of {target} is open; retry in {retry_after_s:.1f} s"
    )
    return CallError(
        grpc.StatusCode.UNAVAILABLE,
        message,
        target=target,
        method=method,
        attempts=1 if in_flight else 0,
        stop_reason="breaker_open",
        trailing_metadata=aio.Metadata(
            (STATUS_DETAILS_KEY, _circuit_open_details(caller, target, method))
        ),
    )


@functools.lru_cache(maxsize=4096)
def _concurrency_limited_details(
    caller: str, target: str, method: str, limit: int, retry_after_s: float
) -> bytes:
    status = rich_status(
        grpc.StatusCode.UNAVAILABLE,
        f"{limit} calls to {target} are in flight already",
        domain=caller,
        reason=CONCURRENCY_LIMITED_REASON,
        metadata={"target": target, "method": method, "limit": str(limit)},
        retry_delay_s=retry_after_s,
    )
    serialized: bytes = status.SerializeToString()
    return serialized


def concurrency_limited_error(
    *,
    caller: str,
    target: str,
    method: str,
    limit: int,
    retry_after_s: float,
    attempts: int = 0,
    http: bool = False,
) -> CallError:
    """The local refusal of a call beyond its target's limit in flight: UNAVAILABLE, ErrorInfo
    CONCURRENCY_LIMITED naming target and limit, RetryInfo ``retry_after_s``; this attempt was
    not sent (``attempts`` counts the earlier ones). A PartnerCallError when ``http``."""
    message = f"{limit} calls to {target} are in flight already; retry in {retry_after_s:.1f} s"
    details = _concurrency_limited_details(caller, target, method, limit, retry_after_s)
    trailing = aio.Metadata((STATUS_DETAILS_KEY, details))
    fields: dict[str, Any] = {
        "target": target,
        "method": method,
        "attempts": attempts,
        "stop_reason": "concurrency_limited",
        "trailing_metadata": trailing,
    }
    if http:
        return PartnerCallError(grpc.StatusCode.UNAVAILABLE, message, http_status=None, **fields)
    return CallError(grpc.StatusCode.UNAVAILABLE, message, **fields)


def retry_delay_of(status: status_pb2.Status) -> float | None:
    """google.rpc.RetryInfo's delay in a status, in seconds, if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


__all__ += [
    "CIRCUIT_OPEN_REASON",
    "CONCURRENCY_LIMITED_REASON",
    "STOP_REASONS",
    "CallError",
    "PartnerCallError",
    "circuit_open_error",
    "concurrency_limited_error",
    "retry_delay_of",
]
