"""Domain errors that servicers raise, and the status each becomes.

A servicer raises one of these; the server interceptor (``services.mesh.server``) turns it
into a status with exactly one google.rpc.ErrorInfo (a stable :class:`Reason`, ``domain`` =
the service) and, for bad input, google.rpc.BadRequest field violations. What a caller
catches in return are the typed client errors of ``interceptors.errors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import status_pb2

from interceptors.errors import Reason, rich_status


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
    default_reason: Reason = Reason.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay_s: float | None = None,
        pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # Reason(): a reason the contract does not know fails here, where it is raised.
        self.reason = Reason(reason) if reason else self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        self.pushback_ms = pushback_ms


class InvalidArgument(ServiceError):
    """The request is malformed; repeating it unchanged can never succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = Reason.VALIDATION_FAILED


class NotFound(ServiceError):
    """A named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.NOT_FOUND


class AlreadyExists(ServiceError):
    """The resource the request would create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The system is not in a state the request needs (refund above captured, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    """The caller's credentials are missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.API_KEY_INVALID


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = Reason.PERMISSION_DENIED


class OutOfRange(ServiceError):
    """A value is past the range the operation accepts."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = Reason.OUT_OF_RANGE


class Aborted(ServiceError):
    """A concurrent operation conflicts; the caller may retry with the same idempotency key."""

    code = grpc.StatusCode.ABORTED
    default_reason = Reason.ABORTED


class ResourceExhausted(ServiceError):
    """A quota or capacity is used up."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = Reason.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """This service cannot serve now (a dependency is down, the process is stopping)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = Reason.UNAVAILABLE


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


__all__ = [
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
    "service_error_status",
]
