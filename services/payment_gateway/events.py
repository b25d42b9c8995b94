"""What a finished payment or refund announces, as outbox messages with stable event ids.

Each terminal outcome is one event (``payment.succeeded``, ``payment.refunded``,
``refund.failed``, ...) with the id ``evt_<payment or refund id>_<event>``. That id is the
request id of the webhook at notification-service (and ``event_id`` in its payload, for the
merchant to dedupe on), of the analytics event and of the order status change, so every
destination dedupes a resend. Pure functions of the stored rows: no I/O.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from google.protobuf.descriptor import FileDescriptor

from paymesh.analytics.v1 import analytics_pb2
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2
from paymesh.order.v1 import order_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.mesh.topology import Target
from services.payment_gateway.outbox import OutboxMessage
from services.storage.sql import timestamp

if TYPE_CHECKING:  # the store imports this module to write the events of its transactions
    from services.payment_gateway.store import PaymentRecord, RefundRecord

NOTIFICATIONS, ANALYTICS, ORDERS = Target.NOTIFICATION, Target.ANALYTICS, Target.ORDER


def _path(file: FileDescriptor, service: str, method: str) -> str:
    return f"/{file.services_by_name[service].full_name}/{method}"


SEND_NOTIFICATION = _path(notification_pb2.DESCRIPTOR, "NotificationService", "SendNotification")
RECORD_EVENT = _path(analytics_pb2.DESCRIPTOR, "AnalyticsService", "RecordEvent")
UPDATE_ORDER_STATUS = _path(order_pb2.DESCRIPTOR, "OrderService", "UpdateOrderStatus")

#: The event of each terminal payment status, as a webhook type and an analytics type.
PAYMENT_EVENTS = {
    pg.PAYMENT_STATUS_SUCCEEDED: ("payment.succeeded", analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED),
    pg.PAYMENT_STATUS_DECLINED: ("payment.declined", analytics_pb2.EVENT_TYPE_PAYMENT_DECLINED),
    pg.PAYMENT_STATUS_FAILED: ("payment.failed", analytics_pb2.EVENT_TYPE_PAYMENT_FAILED),
    pg.PAYMENT_STATUS_VOIDED: ("payment.voided", analytics_pb2.EVENT_TYPE_PAYMENT_VOIDED),
}
REFUND_SUCCEEDED = "payment.refunded"
REFUND_FAILED = "refund.failed"
#: Not a merchant event: the cancellation of an order a payment that never started may have made.
ORDER_ABANDONED = "order.abandoned"


def event_id(flow_id: str, event: str) -> str:
    """The stable id of ``event`` of a payment or refund (at most 64 characters)."""
    return f"evt_{flow_id}_{event}"


def _webhook(
    evt: str, merchant_id: str, url: str, event: str, payload: dict[str, object]
) -> OutboxMessage:
    return OutboxMessage(
        event_id=evt,
        target=NOTIFICATIONS,
        method=SEND_NOTIFICATION,
        request=notification_pb2.SendNotificationRequest(
            request_id=evt,
            merchant_id=merchant_id,
            event_type=event,
            payload_json=json.dumps({"event_id": evt, **payload}, sort_keys=True),
            webhook_url=url,
        ),
    )


def _order_status(
    evt: str,
    order_id: str,
    status: order_pb2.OrderStatus.ValueType,
    reason: str,
    *,
    missing_ok: bool = False,
) -> OutboxMessage:
    return OutboxMessage(
        event_id=evt,
        target=ORDERS,
        method=UPDATE_ORDER_STATUS,
        request=order_pb2.UpdateOrderStatusRequest(
            request_id=evt, order_id=order_id, status=status, reason=reason
        ),
        missing_ok=missing_ok,
    )


def payment_events(p: PaymentRecord, *, order_paid: bool = True) -> list[OutboxMessage]:
    """Webhook, analytics event and the order's new status (PAID, or CANCELLED unless it
    succeeded) of a payment that reached its terminal status.

    ``order_paid=False`` leaves out the PAID of a succeeded payment (its flow already set it).
    """
    status = pg.PaymentStatus.ValueType(p.status)
    if status in (pg.PAYMENT_STATUS_PARTIALLY_REFUNDED, pg.PAYMENT_STATUS_REFUNDED):
        # Refunded since (a payment migrated with its announcement still unsent): the
        # payment's own event is its success; each refund has an event of its own.
        status = pg.PAYMENT_STATUS_SUCCEEDED
    event, analytics_type = PAYMENT_EVENTS[status]
    evt = event_id(p.payment_id, event)
    amount = p.amount
    if status == pg.PAYMENT_STATUS_SUCCEEDED:
        amount = common_pb2.Money(amount_minor=p.captured_minor, currency_code=p.currency_code)
    payload: dict[str, object] = {
        "event": event,
        "payment_id": p.payment_id,
        "merchant_id": p.merchant_id,
        "status": pg.PaymentStatus.Name(status).removeprefix("PAYMENT_STATUS_"),
        "amount_minor": p.amount_minor,
        "currency_code": p.currency_code,
        "captured_minor": p.captured_minor,
        "order_id": p.order_id,
        "merchant_order_reference": p.merchant_order_reference,
        "decline_reason": p.decline_reason,
        "failure_reason": p.failure_reason,
    }
    messages = [
        _webhook(evt, p.merchant_id, p.webhook_url, event, payload),
        OutboxMessage(
            event_id=evt,
            target=ANALYTICS,
            method=RECORD_EVENT,
            request=analytics_pb2.RecordEventRequest(
                request_id=evt,
                merchant_id=p.merchant_id,
                event_type=analytics_type,
                payment_id=p.payment_id,
                amount=amount,
                occur_time=timestamp(p.finish_time_ns),
            ),
        ),
    ]
    if p.order_id and status == pg.PAYMENT_STATUS_SUCCEEDED and order_paid:
        messages.append(
            _order_status(evt, p.order_id, order_pb2.ORDER_STATUS_PAID, "payment succeeded")
        )
    elif p.order_id and status != pg.PAYMENT_STATUS_SUCCEEDED:
        messages.append(
            _order_status(
                evt,
                p.order_id,
                order_pb2.ORDER_STATUS_CANCELLED,
                p.decline_reason or p.failure_reason,
            )
        )
    return messages


def refund_events(r: RefundRecord, payment: PaymentRecord) -> list[OutboxMessage]:
    """What a refund that reached its terminal status announces: on success the order's new
    status, the webhook and the analytics event; on failure the webhook."""
    succeeded = r.status == pg.REFUND_STATUS_SUCCEEDED
    event = REFUND_SUCCEEDED if succeeded else REFUND_FAILED
    evt = event_id(r.refund_id, event)
    payload: dict[str, object] = {
        "event": event,
        "refund_id": r.refund_id,
        "payment_id": r.payment_id,
        "merchant_id": r.merchant_id,
        "amount_minor": r.amount_minor,
        "currency_code": r.currency_code,
        "reason": r.reason,
    }
    if not succeeded:
        payload["failure_reason"] = r.failure_reason
    messages = [_webhook(evt, r.merchant_id, payment.webhook_url, event, payload)]
    if succeeded:
        messages.append(
            OutboxMessage(
                event_id=evt,
                target=ANALYTICS,
                method=RECORD_EVENT,
                request=analytics_pb2.RecordEventRequest(
                    request_id=evt,
                    merchant_id=r.merchant_id,
                    event_type=analytics_pb2.EVENT_TYPE_PAYMENT_REFUNDED,
                    payment_id=r.payment_id,
                    amount=common_pb2.Money(
                        amount_minor=r.amount_minor, currency_code=r.currency_code
                    ),
                    occur_time=timestamp(r.finish_time_ns),
                ),
            )
        )
        if payment.order_id:
            messages.insert(
                0,
                _order_status(
                    evt,
                    payment.order_id,
                    order_pb2.OrderStatus.ValueType(r.order_status),
                    f"refund {r.refund_id}",
                ),
            )
    return messages


def abandoned_order(p: PaymentRecord, reason: str) -> list[OutboxMessage]:
    """The cancellation of the order a payment that never started may have created (its
    CreateOrder call failed without an answer); NOT_FOUND means it was never created."""
    return [
        _order_status(
            event_id(p.payment_id, ORDER_ABANDONED),
            p.order_id or order_id_of(p.payment_id),
            order_pb2.ORDER_STATUS_CANCELLED,
            f"payment not started: {reason}",
            missing_ok=True,
        )
    ]


def order_id_of(payment_id: str) -> str:
    """The order id recorded for a payment: deterministic, so a re-run finds the same order."""
    return f"ord_{payment_id.removeprefix('pay_')}"
