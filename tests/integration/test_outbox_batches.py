"""The gateway's outbox relay against real analytics, order and notification services: a
destination's due rows go in one batch call (counted by the destination's own metrics), each
row marked by its own result; a destination down for the whole call gets every row again
later, nothing lost or doubled; one that does not take the batch gets the rows one by one."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

from interceptors.errors import wrap_errors
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.analytics.__main__ import build as build_analytics
from services.notification.__main__ import build as build_notification
from services.order.__main__ import build as build_order
from services.payment_gateway import events
from services.payment_gateway.flow import Downstreams
from services.payment_gateway.outbox import (
    PENDING,
    REFUSED,
    SCHEMA,
    SENT,
    Outbox,
    OutboxMessage,
    OutboxRelay,
    RelayPolicy,
)
from services.storage.sql import Database
from services.tools.launcher import free_port
from tests.servers import ServicesUnderTest, mesh_channel
from tests.unit.fakes import FakeClock

ANALYTICS, ORDERS, NOTIFICATIONS = events.ANALYTICS, events.ORDERS, events.NOTIFICATIONS
BUILDS: dict[str, Any] = {
    ORDERS: build_order,
    NOTIFICATIONS: build_notification,
    ANALYTICS: build_analytics,
}
STUBS: dict[str, Any] = {
    ORDERS: order_pb2_grpc.OrderServiceStub,
    NOTIFICATIONS: notification_pb2_grpc.NotificationServiceStub,
    ANALYTICS: analytics_pb2_grpc.AnalyticsServiceStub,
}
N = 5


class TypedStub:
    """A stub whose calls raise the typed errors the relay's chain would; ``channel`` may be
    swapped for one to a restarted destination."""

    def __init__(self, stub_type: Any, address: str, *, as_: str) -> None:
        self._stub_type = stub_type
        self.channels: list[Any] = []
        self.point_at(address, as_=as_)

    def point_at(self, address: str, *, as_: str = "payment-gateway") -> None:
        channel = mesh_channel(address, as_=as_)
        self.channels.append(channel)
        self.stub = self._stub_type(channel)

    def __getattr__(self, method: str) -> Any:
        async def call(request: Message) -> Any:
            return await wrap_errors(getattr(self.stub, method))(request, timeout=5)

        return call


@dataclass
class Relayed:
    services: ServicesUnderTest
    outbox: Outbox
    db: Database
    clock: FakeClock
    relay: OutboxRelay
    stubs: dict[str, TypedStub]
    admins: dict[str, str]

    def write(self, *messages: OutboxMessage) -> None:
        with self.db.transaction() as tx:
            self.outbox.add(tx, "pay_1", messages)

    def states(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for row in self.outbox.rows():
            found.setdefault(row.target, []).append(row.state)
        return found

    async def served(self, target: str) -> dict[tuple[str, str], float]:
        """The destination's own count of the calls it answered, by method name and code."""
        url = f"http://{self.admins[target]}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        return {
            (s.labels["method"].rsplit("/", 1)[1], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
            if s.name == "paymesh_server_rpcs_total" and s.labels.get("service") == target
        }


async def _relayed(
    services: ServicesUnderTest, tmp_path: Path, *, notifications_as: str = "payment-gateway"
) -> AsyncIterator[Relayed]:
    services.sandbox()
    admins = {name: f"127.0.0.1:{free_port()}" for name in BUILDS}
    stubs: dict[str, TypedStub] = {}
    for name, build in BUILDS.items():
        address = await services.start(
            name, build, environ={f"{name.upper().replace('-', '_')}_ADMIN_ADDR": admins[name]}
        )
        caller = notifications_as if name == NOTIFICATIONS else "payment-gateway"
        stubs[name] = TypedStub(STUBS[name], address, as_=caller)
    clock = FakeClock(start=1_700_000_000.0)
    db = Database(tmp_path / "outbox.db", SCHEMA)
    outbox = Outbox(db, clock=clock)
    downstreams = Downstreams(
        risk=cast(Any, None),
        channel=cast(Any, None),
        accounting=cast(Any, None),
        orders=cast(Any, stubs[ORDERS]),
        notifications=cast(Any, stubs[NOTIFICATIONS]),
        analytics=cast(Any, stubs[ANALYTICS]),
    )
    relay = OutboxRelay(
        outbox, downstreams.outbox_routes(), policy=RelayPolicy(), clock=clock, rng=lambda: 1.0
    )
    try:
        yield Relayed(services, outbox, db, clock, relay, stubs, admins)
    finally:
        for stub in stubs.values():
            for channel in stub.channels:
                await channel.close()
        db.close()


@pytest.fixture
async def relayed(services: ServicesUnderTest, tmp_path: Path) -> AsyncIterator[Relayed]:
    async for found in _relayed(services, tmp_path):
        yield found


def _event(evt: str, amount: int = 1000) -> OutboxMessage:
    return OutboxMessage(
        event_id=evt,
        target=ANALYTICS,
        method=events.RECORD_EVENT,
        request=analytics_pb2.RecordEventRequest(
            request_id=evt,
            merchant_id="m_1",
            event_type=analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED,
            payment_id=f"pay_{evt}",
            amount=common_pb2.Money(amount_minor=amount, currency_code="EUR"),
        ),
    )


def _status(evt: str, order_id: str, *, missing_ok: bool = False) -> OutboxMessage:
    return OutboxMessage(
        event_id=evt,
        target=ORDERS,
        method=events.UPDATE_ORDER_STATUS,
        request=order_pb2.UpdateOrderStatusRequest(
            request_id=evt, order_id=order_id, status=order_pb2.ORDER_STATUS_PAID, reason="paid"
        ),
        missing_ok=missing_ok,
    )


def _webhook(evt: str) -> OutboxMessage:
    return OutboxMessage(
        event_id=evt,
        target=NOTIFICATIONS,
        method=events.SEND_NOTIFICATION,
        request=notification_pb2.SendNotificationRequest(
            request_id=evt,
            merchant_id="m_1",
            event_type="payment.succeeded",
            payload_json=json.dumps({"event_id": evt}),
            webhook_url="https://merchant.example/hooks",
        ),
    )


async def _orders(relayed: Relayed, count: int) -> None:
    for i in range(count):
        await relayed.stubs[ORDERS].CreateOrder(
            order_pb2.CreateOrderRequest(
                request_id=f"c_{i}",
                order_id=f"ord_{i}",
                merchant_id="m_1",
                payment_id=f"pay_{i}",
                amount=common_pb2.Money(amount_minor=1000, currency_code="EUR"),
            )
        )


async def _read(relayed: Relayed, target: str) -> Any:
    """A stub of ``target`` as a caller granted its reads (the operator)."""
    return await relayed.services.stub(relayed.services.addresses[target], STUBS[target], target)


async def _event_count(relayed: Relayed) -> int:
    reply = await (await _read(relayed, ANALYTICS)).GetMerchantStats(
        analytics_pb2.GetMerchantStatsRequest(merchant_id="m_1")
    )
    return int(reply.stats.event_count)


def _ids(n: int) -> Iterator[str]:
    return (f"evt_{i}" for i in range(n))


async def test_each_destination_gets_its_due_rows_in_one_call_and_each_row_its_result(
    relayed: Relayed,
) -> None:
    await _orders(relayed, N)
    relayed.write(
        *(_event(evt) for evt in _ids(N)),
        _event("evt_zero", amount=0),  # refused for good: INVALID_ARGUMENT
        *(_status(evt, f"ord_{i}") for i, evt in enumerate(_ids(N))),
        _status("evt_lost", "ord_missing"),  # refused for good: NOT_FOUND
        _status("evt_abandoned", "ord_never", missing_ok=True),  # nothing to cancel: done
        *(_webhook(evt) for evt in _ids(N)),
    )
    for target in (ANALYTICS, ORDERS, NOTIFICATIONS):
        await relayed.relay.deliver_due(target)

    assert relayed.states() == {
        ANALYTICS: [SENT] * N + [REFUSED],
        ORDERS: [SENT] * N + [REFUSED, SENT],
        NOTIFICATIONS: [SENT] * N,
    }
    for target, batch, single in (
        (ANALYTICS, "RecordEvents", "RecordEvent"),
        (ORDERS, "UpdateOrderStatuses", "UpdateOrderStatus"),
        (NOTIFICATIONS, "SendNotifications", "SendNotification"),
    ):
        served = await relayed.served(target)
        assert served.get((batch, "OK")) == 1, (target, served)
        assert not any(method == single for method, _ in served), (target, served)
    assert await _event_count(relayed) == N
    orders = await _read(relayed, ORDERS)
    order = await orders.GetOrder(order_pb2.GetOrderRequest(order_id="ord_0"))
    assert order.order.status == order_pb2.ORDER_STATUS_PAID


async def test_a_destination_down_for_the_whole_call_gets_every_row_again_once_back(
    relayed: Relayed,
) -> None:
    relayed.write(*(_event(evt) for evt in _ids(N)))
    # The first event reached analytics before (an answer that was lost): its resend is a
    # duplicate, not a second event.
    await relayed.stubs[ANALYTICS].RecordEvent(_raw(0))
    await relayed.services.stop(ANALYTICS)

    await relayed.relay.deliver_due(ANALYTICS)
    rows = relayed.outbox.rows()
    assert [(r.state, r.attempts) for r in rows] == [(PENDING, 1)] * N
    assert all(r.last_error.startswith("UNAVAILABLE") for r in rows)
    assert {r.next_attempt_time for r in rows} == {relayed.clock() + 0.5}  # one pause for all

    address = await relayed.services.start(
        ANALYTICS,
        build_analytics,
        environ={"ANALYTICS_SERVICE_ADMIN_ADDR": relayed.admins[ANALYTICS]},
    )
    relayed.stubs[ANALYTICS].point_at(address)
    await relayed.relay.deliver_due(ANALYTICS)  # still paused: nothing sent
    assert {r.state for r in relayed.outbox.rows()} == {PENDING}
    relayed.clock.advance(0.5)
    await relayed.relay.deliver_due(ANALYTICS)

    assert [(r.state, r.attempts) for r in relayed.outbox.rows()] == [(SENT, 2)] * N
    assert await _event_count(relayed) == N
    assert (await relayed.served(ANALYTICS)).get(("RecordEvents", "OK")) == 1


def _raw(i: int) -> analytics_pb2.RecordEventRequest:
    request = _event(f"evt_{i}").request
    assert isinstance(request, analytics_pb2.RecordEventRequest)
    return request


async def test_a_destination_that_does_not_take_the_batch_gets_the_rows_one_by_one(
    services: ServicesUnderTest, tmp_path: Path
) -> None:
    # settlement-service's identity may SendNotification but not SendNotifications: as an
    # older topology would answer the batch.
    async for relayed in _relayed(services, tmp_path, notifications_as="settlement-service"):
        relayed.write(*(_webhook(evt) for evt in _ids(N)))
        await relayed.relay.deliver_due(NOTIFICATIONS)
        assert relayed.states() == {NOTIFICATIONS: [SENT] * N}
        served = await relayed.served(NOTIFICATIONS)
        assert served.get(("SendNotifications", "PERMISSION_DENIED")) == 1
        assert served.get(("SendNotification", "OK")) == N
