"""Errors on the wire and what a client call raises: rich statuses, reasons, typed exceptions.

A failed call carries one google.rpc.Status (``grpc-status-details-bin``) with exactly one
ErrorInfo whose ``reason`` is a :class:`Reason`, a value of ``paymesh.common.v1.ErrorReason``;
every part of a status is cut to a bound, so no input can be echoed back whole. A caller
sees one typed exception per status code (:class:`NotFoundError`, ...; api-core style),
built at one boundary, the :class:`CallError` constructor (``from_grpc_error`` for an
``RpcError`` raised outside the chain), and carrying the callee's ErrorInfo reason.
The domain errors servicers raise live with the runtime, in ``services.mesh.errors``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, ParamSpec, Protocol, Self, TypeVar, cast, get_args

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from interceptors.codes import TABLE, CodeTraits
from interceptors.retry import StopReason
from paymesh.common.v1 import common_pb2

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

#: How an ErrorReason value name begins in the proto; ErrorInfo.reason goes without it.
REASON_PREFIX = "ERROR_REASON_"


class Reason(enum.StrEnum):
    """An ErrorInfo reason: a value of ``paymesh.common.v1.ErrorReason`` without its prefix.

    Each member must name a value of the proto enum (the class does not load otherwise), so a
    reason the contract does not know cannot be written; a test checks that every value of the
    enum has its member. Add a reason to ``common.proto`` first, then here.
    """

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]) -> str:
        common_pb2.ErrorReason.Value(REASON_PREFIX + name)  # ValueError if not in the proto
        return name

    VALIDATION_FAILED = enum.auto()
    NOT_FOUND = enum.auto()
    MERCHANT_NOT_FOUND = enum.auto()
    MERCHANT_INACTIVE = enum.auto()
    API_KEY_INVALID = enum.auto()
    API_KEY_REVOKED = enum.auto()
    PAYMENT_NOT_FOUND = enum.auto()
    AMOUNT_INVALID = enum.auto()
    CURRENCY_UNSUPPORTED = enum.auto()
    REFUND_EXCEEDS_CAPTURED = enum.auto()
    INVALID_STATE = enum.auto()
    INSUFFICIENT_BALANCE = enum.auto()
    IDEMPOTENCY_KEY_REUSED = enum.auto()
    IDEMPOTENCY_KEY_IN_FLIGHT = enum.auto()
    LEDGER_UNBALANCED = enum.auto()
    ALREADY_EXISTS = enum.auto()
    CIRCUIT_OPEN = enum.auto()
    DOWNSTREAM_UNAVAILABLE = enum.auto()
    DEADLINE_EXHAUSTED = enum.auto()
    RETRY_BUDGET_EXHAUSTED = enum.auto()
    RISK_DECLINED = enum.auto()
    CHANNEL_DECLINED = enum.auto()
    EXCHANGE_RATE_UNAVAILABLE = enum.auto()
    PAGE_TOKEN_INVALID = enum.auto()
    INTERNAL_ERROR = enum.auto()
    CALLER_NOT_AUTHORIZED = enum.auto()
    CREDENTIALS_MISSING = enum.auto()
    OVERLOADED = enum.auto()
    TOO_MANY_FAILED_ATTEMPTS = enum.auto()
    TLS_HANDSHAKE_FAILED = enum.auto()
    FAULT_INJECTED = enum.auto()
    CONCURRENCY_LIMITED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    PERMISSION_DENIED = enum.auto()
    OUT_OF_RANGE = enum.auto()
    ABORTED = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    UNAVAILABLE = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    UNAUTHENTICATED = enum.auto()
    UNIMPLEMENTED = enum.auto()
    DATA_LOSS = enum.auto()
    ADMIN_TOKEN_INVALID = enum.auto()
    FAULT_INJECTION_DISABLED = enum.auto()


def reason_for_code(code: grpc.StatusCode) -> Reason:
    """The reason of a status of ``code`` that came without one (the codes table's column)."""
    traits = TABLE.get(code.name)
    return Reason(traits.reason) if traits is not None else Reason.INTERNAL_ERROR


def known_reason(reason: str, code: grpc.StatusCode) -> Reason:
    """``reason`` if the contract knows it, else the reason of a bare status of ``code``."""
    try:
        return Reason(reason)
    except ValueError:
        return reason_for_code(code)


class FieldViolationLike(Protocol):
    """One bad field of a request, as a BadRequest detail names it."""

    @property
    def field(self) -> str:
        """Path of the field (``amount.amount_minor``)."""

    @property
    def description(self) -> str:
        """Why it is bad."""


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
    reason: Reason,
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[FieldViolationLike] = (),
    retry_delay_s: float | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status with exactly one ErrorInfo and the optional details.

    Every part is cut to the ``MAX_*`` bounds above, whatever the caller put in it;
    ``reason`` must be a :class:`Reason` (ValueError otherwise).
    """
    reason = Reason(reason)
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
            _packed(
                error_details_pb2.ErrorInfo(reason=str(reason), domain=domain, metadata=bounded)
            )
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


def status_code(status: status_pb2.Status) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status."""
    return _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


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


def retry_delay_of(status: status_pb2.Status) -> float | None:
    """google.rpc.RetryInfo's delay in a status, in seconds, if it has one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


#: The google.rpc detail messages a typed error unpacks (others are kept packed).
# Any: googleapis-common-protos ships no stubs (google.rpc.* is untyped here).
_DETAIL_TYPES: tuple[Any, ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.RequestInfo,
)


def _unpacked(detail: any_pb2.Any) -> message.Message:
    for kind in _DETAIL_TYPES:
        if detail.Is(kind.DESCRIPTOR):
            unpacked: message.Message = kind()
            detail.Unpack(unpacked)
            return unpacked
    return detail


# --- What a client call raises -------------------------------------------------------------

#: Why the chain stopped trying, as the core names it (``interceptors.retry.StopReason``).
STOP_REASONS = frozenset(get_args(StopReason))
#: ErrorInfo reason of a call refused locally by an open circuit breaker.
CIRCUIT_OPEN_REASON = Reason.CIRCUIT_OPEN
#: ErrorInfo reason of a call refused locally: its target's limit of calls in flight was reached.
CONCURRENCY_LIMITED_REASON = Reason.CONCURRENCY_LIMITED


class CallError(aio.AioRpcError):
    """A call that failed for good: the last status plus who, what, how often and why it stopped.

    Constructing one picks the class of its code, so ``CallError(grpc.StatusCode.NOT_FOUND,
    ...)`` is a :class:`NotFoundError`: callers write ``except NotFoundError as e`` and read
    ``e.reason``, never compare codes. It is an ``AioRpcError`` so ``code()``, ``details()``
    and ``trailing_metadata()`` work as on any failed call, and a servicer letting it escape
    is mapped by the server interceptor to UNAVAILABLE with pushback ``-1`` (retry in one
    layer only).
    """

    grpc_status_code: ClassVar[grpc.StatusCode | None] = None
    """The code of every instance of the class (None on the bases)."""

    def __new__(cls, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> Self:
        return cast(Self, super().__new__(_class_of(cls, code)))

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

    @functools.cached_property
    def status(self) -> status_pb2.Status:
        """The google.rpc.Status the callee (or the chain) sent; a bare one if none came."""
        return status_from_metadata(
            self.code(), self.details() or "", tuple(self.trailing_metadata() or ())
        )

    @functools.cached_property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        """The status's ErrorInfo, if it has one."""
        return error_info(self.status)

    @property
    def reason(self) -> str:
        """ErrorInfo reason (compare with :class:`Reason` members); empty if none came."""
        return str(self.error_info.reason) if self.error_info is not None else ""

    @property
    def domain(self) -> str:
        """ErrorInfo domain: the mesh name of the service that raised it; empty if none."""
        return str(self.error_info.domain) if self.error_info is not None else ""

    @property
    def metadata(self) -> dict[str, str]:
        """ErrorInfo metadata (not the call's gRPC metadata): what the error is about."""
        return dict(self.error_info.metadata) if self.error_info is not None else {}

    @property
    def status_details(self) -> tuple[message.Message, ...]:
        """Every detail of the status, unpacked where it is a google.rpc detail."""
        return tuple(_unpacked(detail) for detail in self.status.details)

    @property
    def retry_delay_s(self) -> float | None:
        """The RetryInfo delay the status carries, in seconds."""
        return retry_delay_of(self.status)

    @property
    def traits(self) -> CodeTraits:
        """What the code says about the call (``interceptors.codes.TABLE``)."""
        return TABLE.get(self.code().name, TABLE["UNKNOWN"])

    def __str__(self) -> str:
        return (
            f"{self.method} on {self.target} failed with {self.code().name} after "
            f"{self.attempts} attempt(s), stopped: {self.stop_reason}: {self.details()}"
        )

    __repr__ = __str__


class PartnerCallError(CallError):
    """A call to an HTTP partner that failed for good; ``http_status`` is None when none came.

    Constructing one picks the partner class of its code too: ``PartnerCallError(
    grpc.StatusCode.NOT_FOUND, ...)`` is both a PartnerCallError and a NotFoundError.
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, *, http_status: int | None, **kw: Any
    ) -> None:
        super().__init__(code, details, **kw)
        self.http_status = http_status


class CallCancelledError(CallError):
    """CANCELLED: the call was cancelled (not ``asyncio.CancelledError``, hence the name)."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class UnknownError(CallError):
    """UNKNOWN: the callee failed in a way it did not classify."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(CallError):
    """INVALID_ARGUMENT: the request is malformed; BadRequest details name the fields."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(CallError):
    """DEADLINE_EXCEEDED: no answer within the deadline; the outcome is unknown."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(CallError):
    """NOT_FOUND: a named resource does not exist."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(CallError):
    """ALREADY_EXISTS: what the request would create exists already."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(CallError):
    """PERMISSION_DENIED: the caller is known but may not do this."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(CallError):
    """RESOURCE_EXHAUSTED: a quota or capacity is used up; RetryInfo says when to retry."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(CallError):
    """FAILED_PRECONDITION: the system is not in the state the request needs."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(CallError):
    """ABORTED: a concurrent operation conflicted; retry with the same request id."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRangeError(CallError):
    """OUT_OF_RANGE: a value is past the range the operation accepts."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(CallError):
    """UNIMPLEMENTED: the callee does not have the method."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(CallError):
    """INTERNAL: the callee broke inside; the outcome is unknown."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class UnavailableError(CallError):
    """UNAVAILABLE: the callee could not be reached or refused to serve now (a local refusal
    of the chain too: reason CIRCUIT_OPEN, CONCURRENCY_LIMITED or TLS_HANDSHAKE_FAILED)."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(CallError):
    """DATA_LOSS: unrecoverable loss or corruption of data."""

    grpc_status_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(CallError):
    """UNAUTHENTICATED: the caller's credentials are missing or wrong."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


#: The typed class of each status code but OK.
ERROR_CLASSES: Mapping[grpc.StatusCode, type[CallError]] = {
    cls.grpc_status_code: cls
    for cls in (
        CallCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
    if cls.grpc_status_code is not None
}
#: The same for partner calls: each class is a PartnerCallError and the code's class.
PARTNER_ERROR_CLASSES: Mapping[grpc.StatusCode, type[PartnerCallError]] = {
    code: type(
        f"Partner{cls.__name__}",
        (PartnerCallError, cls),
        {"__module__": __name__, "__doc__": f"{cls.__doc__} (from an HTTP partner)"},
    )
    for code, cls in ERROR_CLASSES.items()
}


def _class_of(cls: type[CallError], code: grpc.StatusCode) -> type[CallError]:
    """The class an error of ``code`` constructed as ``cls`` has (the one boundary)."""
    if cls.grpc_status_code is not None:
        if cls.grpc_status_code is not code:
            raise ValueError(f"{cls.__name__} is {cls.grpc_status_code.name}, not {code.name}")
        return cls
    if issubclass(cls, PartnerCallError):
        return PARTNER_ERROR_CLASSES.get(code, PARTNER_ERROR_CLASSES[grpc.StatusCode.UNKNOWN])
    return ERROR_CLASSES.get(code, UnknownError)


def from_grpc_error(
    error: grpc.RpcError,
    *,
    target: str = "",
    method: str = "",
    attempts: int = 1,
    stop_reason: str = "not_retryable",
) -> CallError:
    """The typed error of a failed call made outside the chain (a probe, a tool).

    A CallError is returned as it is; any other ``RpcError`` that is a ``grpc.Call`` (aio
    or sync) becomes the class of its code, with its status, metadata and details.
    """
    if isinstance(error, CallError):
        return error
    if not isinstance(error, aio.AioRpcError | grpc.Call):
        return UnknownError(
            grpc.StatusCode.UNKNOWN,
            str(error),
            target=target,
            method=method,
            attempts=attempts,
            stop_reason=stop_reason,
        )
    initial = error.initial_metadata() or ()
    trailing = error.trailing_metadata() or ()
    debug = error.debug_error_string() if isinstance(error, aio.AioRpcError) else None
    return CallError(
        error.code(),
        error.details() or "",
        target=target,
        method=method,
        attempts=attempts,
        stop_reason=stop_reason,
        initial_metadata=_aio_metadata(initial),
        trailing_metadata=_aio_metadata(trailing),
        debug_error_string=debug,
    )


def _aio_metadata(metadata: Any) -> aio.Metadata:
    if isinstance(metadata, aio.Metadata):
        return metadata
    return aio.Metadata.from_tuple(tuple(metadata))


P = ParamSpec("P")
T = TypeVar("T")


def wrap_errors(
    call: Callable[P, Awaitable[T]], *, target: str = "", method: str = ""
) -> Callable[P, Awaitable[T]]:
    """``call`` (an aio multicallable outside the chain) raising typed errors instead."""

    @functools.wraps(call)
    async def typed(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except aio.AioRpcError as exc:
            raise from_grpc_error(exc, target=target, method=method) from exc

    return typed


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
    """An open breaker's local refusal: an UnavailableError, reason CIRCUIT_OPEN naming the
    target.

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
    """The local refusal of a call beyond its target's limit in flight: an UnavailableError,
    reason CONCURRENCY_LIMITED naming target and limit, RetryInfo ``retry_after_s``; this
    attempt was not sent (``attempts`` counts the earlier ones). A PartnerCallError when
    ``http``."""
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


__all__ = [
    "CIRCUIT_OPEN_REASON",
    "CONCURRENCY_LIMITED_REASON",
    "ERROR_CLASSES",
    "MAX_DESCRIPTION_BYTES",
    "MAX_FIELD_BYTES",
    "MAX_FIELD_VIOLATIONS",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_BYTES",
    "MAX_METADATA_VALUE_BYTES",
    "MAX_STATUS_BYTES",
    "PARTNER_ERROR_CLASSES",
    "PUSHBACK_KEY",
    "REASON_PREFIX",
    "STATUS_DETAILS_KEY",
    "STOP_REASONS",
    "AbortedError",
    "AlreadyExistsError",
    "CallCancelledError",
    "CallError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolationLike",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PartnerCallError",
    "PermissionDeniedError",
    "Reason",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "circuit_open_error",
    "concurrency_limited_error",
    "error_info",
    "from_grpc_error",
    "known_reason",
    "reason_for_code",
    "retry_delay_of",
    "rich_status",
    "status_code",
    "status_from_metadata",
    "truncated",
    "wrap_errors",
]
