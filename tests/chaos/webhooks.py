"""What the merchants' webhook endpoint (the partner sandbox) accepted, against what was due.

notification-service holds every notification of the run's merchants; the gateway's payments,
the settlements and the withdrawals say which events there must be. The sandbox records each
delivery it accepted once per ``Idempotency-Key`` (the notification id, the same on every
attempt), with how often that key was accepted: more than once is a duplicate at the receiver.
"""

from __future__ import annotations

import json
import statistics
import urllib.request
from datetime import datetime
from typing import Any

from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.mesh.tls import TransportSecurity
from services.payment_gateway.events import PAYMENT_EVENTS, event_id
from tests.chaos.invariants import TERMINAL, Check, pages
from tests.chaos.load import Merchant

DELIVERED = notification_pb2.DELIVERY_STATUS_DELIVERED


async def notifications(
    address: str, merchants: list[Merchant], operator: TransportSecurity
) -> list[Any]:
    """Every notification of the run's merchants, from notification-service (as the operator)."""
    async with operator.aio_channel("notification-service", address) as channel:
        stub = notification_pb2_grpc.NotificationServiceStub(channel)
        found: list[Any] = []
        for merchant in merchants:
            found += await pages(
                stub.ListNotifications,
                notification_pb2.ListNotificationsRequest(
                    merchant_id=merchant.merchant_id, page_size=500
                ),
                "notifications",
            )
    return found


def received(sandbox_address: str) -> list[dict[str, Any]]:
    """Every delivery the sandbox accepted, once per key, with ``accepted`` (times) and
    ``received_at`` (the first)."""
    with urllib.request.urlopen(
        f"http://{sandbox_address}/merchant-webhooks/received", timeout=10
    ) as reply:
        return list(json.load(reply)["deliveries"])


def requests_seen(sandbox_address: str) -> int:
    """Requests the webhook partner got, refused ones (an injected 503) included."""
    with urllib.request.urlopen(f"http://{sandbox_address}/_control/stats", timeout=10) as reply:
        return int(json.load(reply)["requests"].get("merchant-webhooks", 0))


def _event_of(delivery: dict[str, Any]) -> str:
    payload = delivery.get("payload")
    return str(payload.get("event_id", "")) if isinstance(payload, dict) else ""


def _announced(deliveries: list[dict[str, Any]], noun: str, key: str) -> set[str]:
    """The ids the receiver heard of in ``<noun>.*`` events (``settlement.completed``, ...)."""
    return {
        str(d["payload"].get(key, ""))
        for d in deliveries
        if str(d.get("event_type", "")).startswith(f"{noun}.")
        and isinstance(d.get("payload"), dict)
    }


def wall_time(iso: str) -> float:
    """Epoch seconds of the sandbox's ``received_at``."""
    return datetime.fromisoformat(iso).timestamp()


def due_events(payments: list[Any]) -> set[str]:
    """The event ids the gateway must have announced: one per payment in a terminal status."""
    due = set()
    for p in payments:
        if p.status not in TERMINAL:
            continue
        status = p.status
        if status in (pg.PAYMENT_STATUS_REFUNDED, pg.PAYMENT_STATUS_PARTIALLY_REFUNDED):
            status = pg.PAYMENT_STATUS_SUCCEEDED
        due.add(event_id(p.payment_id, PAYMENT_EVENTS[status][0]))
    return due


def check_webhooks(
    notes: list[Any],
    deliveries: list[dict[str, Any]],
    payments: list[Any],
    settlements: set[str],
    withdrawals: set[str],
) -> list[Check]:
    """Every event delivered, each exactly once at the receiver; nothing unknown received.

    Args:
        notes: notification-service's notifications of the run's merchants.
        deliveries: what the receiver accepted.
        payments: the gateway's payments of the run's merchants.
        settlements: the run's settlement ids (each must have been announced).
        withdrawals: the run's withdrawal ids (each must have been announced).
    """
    by_key = {d["idempotency_key"]: d for d in deliveries}
    ids = {n.notification_id for n in notes}
    undelivered = [n for n in notes if n.delivery_status != DELIVERED]
    missing = sorted(ids - set(by_key))
    twice = sorted(k for k, d in by_key.items() if int(d.get("accepted", 1)) > 1)
    unknown = sorted(set(by_key) - ids)
    keyless = [d for d in deliveries if not d["idempotency_key"]]
    events: dict[str, int] = {}
    for d in deliveries:
        if _event_of(d):
            events[_event_of(d)] = events.get(_event_of(d), 0) + int(d.get("accepted", 1))
    due = due_events(payments)
    unannounced = sorted(due - set(events))
    stray = sorted(set(events) - due)
    event_twice = sorted(e for e, n in events.items() if n > 1)
    payouts_unannounced = sorted(
        (settlements - _announced(deliveries, "settlement", "settlement_id"))
        | (withdrawals - _announced(deliveries, "withdrawal", "withdrawal_id"))
    )
    statuses: dict[str, int] = {}
    for n in undelivered:
        name = notification_pb2.DeliveryStatus.Name(n.delivery_status)
        statuses[name] = statuses.get(name, 0) + 1
    return [
        Check(
            "every notification was delivered (notification-service)",
            bool(notes) and not undelivered,
            f"{len(notes)} notifications, {len(notes) - len(undelivered)} DELIVERED; "
            f"not: {statuses} {[n.notification_id for n in undelivered[:3]]}",
        ),
        Check(
            "the receiver accepted every notification exactly once per Idempotency-Key",
            not missing and not twice and not unknown and not keyless,
            f"{len(by_key)} keys accepted, "
            f"{sum(int(d.get('accepted', 1)) for d in deliveries)} deliveries; never: "
            f"{missing[:3]}; twice or more: {twice[:3]}; unknown: {unknown[:3]}; "
            f"without a key: {len(keyless)}",
        ),
        Check(
            "every terminal payment's event reached the receiver exactly once per event id",
            bool(due) and not unannounced and not stray and not event_twice,
            f"{len(due)} payment events due, {len(events)} received; missing "
            f"{unannounced[:3]}; for no such payment: {stray[:3]}; twice: {event_twice[:3]}",
        ),
        Check(
            "every settlement and withdrawal of the run was announced at the receiver",
            not payouts_unannounced,
            f"{len(settlements)} settlements, {len(withdrawals)} withdrawals; not announced: "
            f"{payouts_unannounced[:3]}",
        ),
    ]


def outage_figures(
    notes: list[Any],
    deliveries: list[dict[str, Any]],
    *,
    down_wall: float,
    healed_wall: float,
) -> dict[str, Any]:
    """The backlog of a webhook outage and how long after the heal it was delivered.

    The backlog is every notification created while the endpoint was down.
    """
    backlog = {
        n.notification_id
        for n in notes
        if down_wall <= n.create_time.ToNanoseconds() / 1e9 < healed_wall
    }
    after = sorted(
        wall_time(d["received_at"]) - healed_wall
        for d in deliveries
        if d["idempotency_key"] in backlog
    )
    return {
        "backlog": len(backlog),
        "backlog_delivered": len(after),
        "first_delivery_after_heal_s": round(after[0], 2) if after else None,
        "median_delivery_after_heal_s": round(statistics.median(after), 2) if after else None,
        "all_delivered_after_heal_s": round(after[-1], 2) if after else None,
        "delivered_before_heal": sum(1 for a in after if a < 0),
    }
