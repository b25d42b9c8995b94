"""How a service reads a downstream's failed call: was the outcome unknown, and what reason.

Shared by every service that drives persisted steps across other services (payment-gateway,
settlement-service, withdrawal-service), so they agree on when a write must be retried.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from interceptors.codes import OUTCOME_UNKNOWN
from interceptors.errors import CallError, Reason, known_reason, reason_for_code
from paymesh.notification.v1 import notification_pb2

if TYPE_CHECKING:
    from paymesh.notification.v1 import notification_pb2_grpc

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


async def notify_merchant(
    notifications: notification_pb2_grpc.NotificationServiceAsyncStub,
    *,
    subject_id: str,
    merchant_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    log: logging.Logger,
) -> bool:
    """Announce ``subject_id``'s outcome at the merchant's webhook, once per subject.

    notification-service finds the URL and retries delivery. The request id is
    ``<subject_id>:notification`` and the body is sorted JSON, so a resend is deduped. Returns
    whether the step is done: False only when the outcome is unknown (retry the step later); a
    definite refusal is logged and dropped.
    """
    try:
        await notifications.SendNotification(
            notification_pb2.SendNotificationRequest(
                request_id=f"{subject_id}:notification",
                merchant_id=merchant_id,
                event_type=event_type,
                payload_json=json.dumps(payload, sort_keys=True),
            )
        )
    except CallError as exc:
        if is_ambiguous(exc):
            log.warning("notification of %s not sent yet: %s", subject_id, exc)
            return False
        log.warning("notification of %s refused, dropped: %s", subject_id, exc)
    return True
