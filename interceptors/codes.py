"""The one table of status codes: what each code means to retry, breaker, servers and callers.

Every set of codes the mesh acts on is a column of :data:`TABLE`, so retry, the breaker, the
server's error mapping, the HTTP partner mapping and the services' step drivers read one
source. Codes are names (``"UNAVAILABLE"``), as everywhere in the core: no gRPC import.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeTraits:
    """What one status code says about the call that ended with it."""

    target_unhealthy: bool = False
    """The target, not the request, is at fault: the attempt counts against its breaker."""
    retryable: bool = False
    """Retried by default when the call is safe to repeat (``RetryPolicy.retryable_codes``)."""
    pushback_only: bool = False
    """Retried only when the server said when (pushback or RetryInfo)."""
    outcome_unknown: bool = False
    """The callee may or may not have acted, or the answer may change: retry, never assume."""
    dependency_fault: bool = False
    """Escaping a servicer, says a dependency failed: the caller sees UNAVAILABLE."""
    definite: bool = False
    """The callee's final answer for this request: repeating it can never change it."""
    unreachable: bool = False
    """The callee gave no answer at all (not reached, or not within the deadline)."""
    no_verdict: bool = False
    """Not a verdict on the request: the callee was unreachable or failed inside."""
    reason: str = "DOWNSTREAM_UNAVAILABLE"
    """ErrorReason of a status with this code that came without one (sent by gRPC itself)."""


_T = CodeTraits
#: Every gRPC status code but OK, with its traits, in google.rpc.Code's order (CANCELLED = 1).
TABLE: MappingProxyType[str, CodeTraits] = MappingProxyType(
    {
        "CANCELLED": _T(outcome_unknown=True, dependency_fault=True),
        "UNKNOWN": _T(target_unhealthy=True, outcome_unknown=True, dependency_fault=True),
        "INVALID_ARGUMENT": _T(definite=True, reason="INVALID_ARGUMENT"),
        "DEADLINE_EXCEEDED": _T(
            target_unhealthy=True,
            retryable=True,
            outcome_unknown=True,
            dependency_fault=True,
            unreachable=True,
            no_verdict=True,
            reason="DEADLINE_EXHAUSTED",
        ),
        "NOT_FOUND": _T(definite=True, reason="NOT_FOUND"),
        "ALREADY_EXISTS": _T(reason="ALREADY_EXISTS"),
        "PERMISSION_DENIED": _T(reason="PERMISSION_DENIED"),
        "RESOURCE_EXHAUSTED": _T(pushback_only=True, outcome_unknown=True, dependency_fault=True),
        "FAILED_PRECONDITION": _T(definite=True, reason="FAILED_PRECONDITION"),
        "ABORTED": _T(pushback_only=True, outcome_unknown=True, dependency_fault=True),
        "OUT_OF_RANGE": _T(definite=True, reason="OUT_OF_RANGE"),
        "UNIMPLEMENTED": _T(reason="UNIMPLEMENTED"),
        "INTERNAL": _T(
            target_unhealthy=True, outcome_unknown=True, dependency_fault=True, no_verdict=True
        ),
        "UNAVAILABLE": _T(
            target_unhealthy=True,
            retryable=True,
            outcome_unknown=True,
            dependency_fault=True,
            unreachable=True,
            no_verdict=True,
        ),
        "DATA_LOSS": _T(target_unhealthy=True, dependency_fault=True, reason="DATA_LOSS"),
        "UNAUTHENTICATED": _T(reason="UNAUTHENTICATED"),
    }
)


#: Number of each code name (google.rpc.Code): its place in :data:`TABLE`, OK being 0.
NUMBERS: MappingProxyType[str, int] = MappingProxyType(
    {"OK": 0, **{name: number for number, name in enumerate(TABLE, start=1)}}
)


def codes_where(trait: str) -> frozenset[str]:
    """The code names whose ``trait`` (a :class:`CodeTraits` field) is true."""
    return frozenset(name for name, traits in TABLE.items() if getattr(traits, trait))


#: Codes that count against the target's breaker.
TARGET_UNHEALTHY = codes_where("target_unhealthy")
#: The default of ``RetryPolicy.retryable_codes``: only what says "try again" by itself.
DEFAULT_RETRYABLE = codes_where("retryable")
#: Codes retried only with a server-given delay.
PUSHBACK_ONLY = codes_where("pushback_only")
#: Codes after which a downstream write may or may not have happened.
OUTCOME_UNKNOWN = codes_where("outcome_unknown")
#: Downstream codes that, escaping a servicer, become UNAVAILABLE with pushback -1.
DEPENDENCY_FAULT = codes_where("dependency_fault")
#: Codes that are a callee's final answer.
DEFINITE = codes_where("definite")
#: Codes that say the callee could not be asked: an answer remembered from it may stand in.
UNREACHABLE = codes_where("unreachable")
#: Codes that say the callee could not judge the request (down, out of time, broken inside).
NO_VERDICT = codes_where("no_verdict")

#: HTTP status of a partner's answer to the gRPC code it means (google.rpc.Code's mapping).
HTTP_STATUS_CODES: MappingProxyType[int, str] = MappingProxyType(
    {
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
)


def http_code(status: int) -> str:
    """gRPC code name of an HTTP status (``OK`` for 2xx)."""
    if 200 <= status < 300:
        return "OK"
    return HTTP_STATUS_CODES.get(status, "FAILED_PRECONDITION" if status < 500 else "UNKNOWN")
