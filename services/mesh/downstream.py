"""How a service reads a downstream's failed call: was the outcome unknown, and what reason.

Shared by every service that drives persisted steps across other services (payment-gateway,
settlement-service, withdrawal-service), so they agree on when a write must be retried.
"""

from __future__ import annotations

import grpc
from grpc import aio

from interceptors.errors import error_info, status_from_metadata

#: Codes after which a downstream write may or may not have happened, or the answer may change
#: on retry: retry, never assume. INTERNAL and UNKNOWN count too: the callee may have acted
#: before it failed. Any other code is the callee's definite answer.
AMBIGUOUS_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def is_ambiguous(error: aio.AioRpcError) -> bool:
    """Whether a failed call's outcome is unknown or may change, so it is retried later."""
    return error.code() in AMBIGUOUS_CODES


def reason_of(error: aio.AioRpcError, default: str | None = None) -> str:
    """The ErrorInfo reason the callee sent, else ``default``, else the status code's name."""
    trailing = tuple(error.trailing_metadata() or ())
    info = error_info(status_from_metadata(error.code(), error.details() or "", trailing))
    if info is not None and info.reason:
        return str(info.reason)
    return error.code().name if default is None else default
