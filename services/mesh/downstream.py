"""How a service reads a downstream's failed call: was the outcome unknown, and what reason.

Shared by every service that drives persisted steps across other services (payment-gateway,
settlement-service, withdrawal-service), so they agree on when a write must be retried.
"""

from __future__ import annotations

from interceptors.codes import OUTCOME_UNKNOWN
from interceptors.errors import CallError, Reason, known_reason, reason_for_code

#: Codes after which a downstream write may or may not have happened, or the answer may change
#: on retry: retry, never assume. INTERNAL and UNKNOWN count too: the callee may have acted
#: before it failed. Any other code is the callee's definite answer.
AMBIGUOUS_CODES = OUTCOME_UNKNOWN


def is_ambiguous(error: CallError) -> bool:
    """Whether a failed call's outcome is unknown or may change, so it is retried later."""
    return error.traits.outcome_unknown


def reason_of(error: CallError, default: Reason | None = None) -> Reason:
    """The ErrorInfo reason the callee sent, else ``default``, else the reason of its code.

    A reason the contract does not know counts as none.
    """
    if error.reason:
        return known_reason(error.reason, error.code())
    return reason_for_code(error.code()) if default is None else default
