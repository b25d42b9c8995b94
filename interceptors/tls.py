"""TLS handshake failures of outgoing calls: recognised, reported once, never retried.

A certificate problem (untrusted issuer, expired, wrong name, TLS spoken to a plaintext
port) is configuration, not an unhealthy target: a retry cannot fix it, and counting it
against the breaker would turn one bad certificate into an outage for every caller. grpc
says so only in an UNAVAILABLE's details; the HTTP client sees an ``ssl.SSLError``.
"""

from __future__ import annotations

import ssl

import grpc
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, CallError, PartnerCallError, Reason, rich_status
from interceptors.runtime import ChainRuntime

#: ErrorInfo reason of a call that failed in the TLS handshake (ErrorReason in common.proto).
TLS_HANDSHAKE_FAILED_REASON = Reason.TLS_HANDSHAKE_FAILED

#: How grpc core words a failed handshake (grpc 1.85: ``Tls handshake failed
#: (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...:CERTIFICATE_VERIFY_FAILED: certificate has
#: expired``; older: ``Ssl handshake failed``; a name mismatch: ``Hostname Verification Check
#: failed``), lower-cased.
_GRPC_MARKERS = (
    "handshake failed",
    "certificate_verify_failed",
    "certificate verify failed",
    "hostname verification check failed",
)
#: A peer that closed or reset the connection mid-handshake (``Handshake read failed (Socket
#: closed)``, ``SSL_ERROR_SYSCALL``) is a restart or an overload: transient, retried as usual.
_GRPC_TRANSIENT = ("ssl_error_syscall",)
#: The ssl errors that are the connection going away, not the certificate or protocol.
_SSL_TRANSIENT = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)


def grpc_tls_problem(code: grpc.StatusCode, details: str) -> str | None:
    """The handshake's complaint when a gRPC attempt failed in the TLS handshake, else None."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    lowered = details.lower()
    if any(marker in lowered for marker in _GRPC_TRANSIENT):
        return None
    return details if any(marker in lowered for marker in _GRPC_MARKERS) else None


def ssl_tls_problem(exc: ssl.SSLError) -> str | None:
    """The complaint of an ``ssl.SSLError`` raised by a handshake, None when it is transient."""
    if isinstance(exc, _SSL_TRANSIENT):
        return None
    return str(exc) or type(exc).__name__


def tls_handshake_error(
    runtime: ChainRuntime,
    *,
    target: str,
    method: str,
    problem: str,
    attempts: int,
    http: bool = False,
) -> CallError:
    """The error the caller sees (the loop's observer logs one WARNING and counts it).

    UNAVAILABLE, ``stop_reason`` ``not_retryable``, one ErrorInfo with reason
    ``TLS_HANDSHAKE_FAILED`` naming target and method; the message quotes the problem.
    """
    message = f"TLS handshake with {target} failed: {problem}"
    status = rich_status(
        grpc.StatusCode.UNAVAILABLE,
        message,
        domain=runtime.caller,
        reason=TLS_HANDSHAKE_FAILED_REASON,
        metadata={"target": target, "method": method},
    )
    trailing = aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString()))
    if http:
        return PartnerCallError(
            grpc.StatusCode.UNAVAILABLE,
            message,
            http_status=None,
            target=target,
            method=method,
            attempts=attempts,
            stop_reason="not_retryable",
            trailing_metadata=trailing,
        )
    return CallError(
        grpc.StatusCode.UNAVAILABLE,
        message,
        target=target,
        method=method,
        attempts=attempts,
        stop_reason="not_retryable",
        trailing_metadata=trailing,
    )
