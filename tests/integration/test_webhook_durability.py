"""Durable webhook delivery: at least once per event, retried for days, then dead-lettered.

notification-service runs on loopback and delivers to a real HTTP endpoint that is down (not
listening), failing (503) or slow. Every event ends delivered once the endpoint is back, with
one Idempotency-Key per event on every attempt; a notification left pending survives a
restart; the retry schedule is checked to the second with an injected clock (no jitter),
up to the dead letter at the horizon; an operator redelivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from paymesh.notification.v1 import notification_pb2 as pb
from paymesh.notification.v1 import notification_pb2_grpc as pb_grpc
from services.notification.__main__ import build
from services.notification.config import (
    DELIVERY_SCAN_VAR,
    INLINE_WAIT_VAR,
    RETRY_HORIZON_VAR,
    RETRY_INITIAL_VAR,
    RETRY_MAX_VAR,
)
from services.notification.schedule import DeliverySchedule
from tests.integration.webhook_receiver import receiving_webhooks
from tests.servers import error_reason, granted_stub, running_service

NAME = "notification-service"
T = TypeVar("T")
#: Retries within a test's time: 50 ms doubling to 200 ms, looked for every 20 ms.
FAST = {RETRY_INITIAL_VAR: "0.05", RETRY_MAX_VAR: "0.2", DELIVERY_SCAN_VAR: "0.02"}
#: The first attempt's outcome is in SendNotification's answer.
SETTLED = {INLINE_WAIT_VAR: "10"}
#: Nothing listens here: a notification without a URL finds no merchant-service.
NOWHERE = "127.0.0.1:1"


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Notifier:
    stub: pb_grpc.NotificationServiceAsyncStub

    async def send(self, request_id: str, url: str) -> pb.Notification:
        reply = await self.stub.SendNotification(
            pb.SendNotificationRequest(
                request_id=request_id,
                merchant_id="m_1",
                event_type="payment.succeeded",
                payload_json='{"payment_id": "pay_1"}',
                webhook_url=url,
            )
        )
        return reply.notification

    async def get(self, notification_id: str) -> pb.Notification:
        reply = await self.stub.GetNotification(
            pb.GetNotificationRequest(notification_id=notification_id)
        )
        return reply.notification

    async def redeliver(self, request_id: str, notification_id: str) -> pb.Notification:
        reply = await self.stub.RedeliverNotification(
            pb.RedeliverNotificationRequest(request_id=request_id, notification_id=notification_id)
        )
        return reply.notification

    async def settled(self, notification_id: str, status: int) -> pb.Notification:
        """The notification once it reached ``status`` (or as it is after the deadline)."""
        return await eventually(
            lambda: self.get(notification_id), lambda n: n.delivery_status == status
        )


@contextlib.asynccontextmanager
async def notifier(
    var_dir: Path,
    environ: Mapping[str, str],
    *,
    clock: Callable[[], float] = time.time,
    rng: Callable[[], float] | None = None,
) -> AsyncIterator[Notifier]:
    env = {"PAYMESH_VAR_DIR": str(var_dir), "MERCHANT_SERVICE_ADDR": NOWHERE, **environ}
    builder = functools.partial(build, clock=clock, rng=rng or random.random)
    async with (
        running_service(NAME, builder, environ=env) as address,
        granted_stub(address, pb_grpc.NotificationServiceStub, NAME) as stub,
    ):
        yield Notifier(stub)


async def eventually(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout_s: float = 15.0
) -> T:
    """Poll ``read`` until ``done`` holds or the deadline passes (then the last value)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await read()
        if done(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.02)


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _more_attempts_than(count: int, notification: pb.Notification) -> bool:
    return notification.attempt_count > count


# -- the endpoint down, failing, slow ---------------------------------------------------------


async def test_every_event_is_delivered_once_after_the_endpoint_comes_back(
    tmp_path: Path,
) -> None:
    with receiving_webhooks() as receiver:
        pass  # now nothing listens on its port: the merchant's endpoint is down
    async with notifier(tmp_path, {**FAST, **SETTLED}) as service:
        sent = [await service.send(f"evt_{index}", receiver.url()) for index in range(5)]
        assert {n.delivery_status for n in sent} == {pb.DELIVERY_STATUS_PENDING}
        assert all("ConnectionRefused" in n.last_error for n in sent)
        with receiving_webhooks(receiver):
            final = [
                await service.settled(n.notification_id, pb.DELIVERY_STATUS_DELIVERED) for n in sent
            ]
    assert {n.delivery_status for n in final} == {pb.DELIVERY_STATUS_DELIVERED}
    assert receiver.keys() == {n.notification_id: 1 for n in sent}


async def test_an_endpoint_that_went_down_after_a_delivery_gets_the_next_event_once_back(
    tmp_path: Path,
) -> None:
    async with notifier(tmp_path, {**FAST, **SETTLED}) as service:
        with receiving_webhooks() as receiver:
            first = await service.send("evt_1", receiver.url())
            assert first.delivery_status == pb.DELIVERY_STATUS_DELIVERED
        # Down: the connection kept from the first delivery went with it.
        second = await service.send("evt_2", receiver.url())
        assert second.delivery_status == pb.DELIVERY_STATUS_PENDING
        assert "ConnectionRefused" in second.last_error
        with receiving_webhooks(receiver):
            final = await service.settled(second.notification_id, pb.DELIVERY_STATUS_DELIVERED)
    assert final.delivery_status == pb.DELIVERY_STATUS_DELIVERED
    assert receiver.keys() == {first.notification_id: 1, second.notification_id: 1}


async def test_retries_of_an_event_carry_one_idempotency_key_until_accepted(
    tmp_path: Path,
) -> None:
    with receiving_webhooks() as receiver:
        receiver.failures_first = 2
        async with notifier(tmp_path, {**FAST, **SETTLED}) as service:
            sent = await service.send("evt_1", receiver.url())
            assert (sent.delivery_status, sent.last_response_code) == (
                pb.DELIVERY_STATUS_PENDING,
                503,
            )
            final = await service.settled(sent.notification_id, pb.DELIVERY_STATUS_DELIVERED)
    assert (final.attempt_count, final.last_response_code, final.last_error) == (3, 200, "")
    assert receiver.keys() == {sent.notification_id: 3}
    assert receiver.accepted_keys() == {sent.notification_id: 1}
    assert len({w.body for w in receiver.received}) == 1  # the same event every time


async def test_slow_endpoint_gets_a_pending_answer_and_one_attempt(tmp_path: Path) -> None:
    with receiving_webhooks() as receiver:
        receiver.delay_s = 1.0
        async with notifier(
            tmp_path, {INLINE_WAIT_VAR: "0.1", DELIVERY_SCAN_VAR: "0.02"}
        ) as service:
            sent = await service.send("evt_1", receiver.url())
            assert (sent.delivery_status, sent.attempt_count) == (pb.DELIVERY_STATUS_PENDING, 0)
            final = await service.settled(sent.notification_id, pb.DELIVERY_STATUS_DELIVERED)
    assert final.attempt_count == 1
    assert receiver.keys() == {sent.notification_id: 1}


async def test_pending_notification_survives_a_restart(tmp_path: Path) -> None:
    with receiving_webhooks() as receiver:
        receiver.status = 503
        async with notifier(tmp_path, SETTLED) as service:
            sent = await service.send("evt_1", receiver.url())
        assert sent.delivery_status == pb.DELIVERY_STATUS_PENDING
        receiver.status = 200
        # The new process's clock is past the stored next attempt time.
        later = functools.partial(lambda offset: time.time() + offset, 60.0)
        async with notifier(tmp_path, {DELIVERY_SCAN_VAR: "0.02"}, clock=later) as service:
            final = await service.settled(sent.notification_id, pb.DELIVERY_STATUS_DELIVERED)
    assert final.attempt_count == 2
    assert receiver.accepted_keys() == {sent.notification_id: 1}


async def test_pending_notification_of_an_older_version_is_delivered(tmp_path: Path) -> None:
    """A database written before the schedule existed: its PENDING rows become due."""
    with sqlite3.connect(tmp_path / f"{NAME}.db") as old:
        old.executescript(OLD_SCHEMA)
    with receiving_webhooks() as receiver:
        with sqlite3.connect(tmp_path / f"{NAME}.db") as old:
            old.execute(
                "INSERT INTO notifications (notification_id, request_id, merchant_id, event_type,"
                " payload_json, webhook_url, delivery_status, attempt_count, create_time)"
                " VALUES ('ntf_old', 'evt_old', 'm_1', 'payment.succeeded', '{}', ?, 1, 1, ?)",
                (receiver.url(), time.time() - 900),
            )
        async with notifier(tmp_path, {DELIVERY_SCAN_VAR: "0.02"}) as service:
            final = await service.settled("ntf_old", pb.DELIVERY_STATUS_DELIVERED)
    assert final.attempt_count == 2
    assert receiver.keys() == {"ntf_old": 1}


# -- the schedule, to the dead letter, and redelivery --------------------------------------------


def _expected_attempt_times(start: float, schedule: DeliverySchedule) -> list[float]:
    """When each retry comes without jitter: after each failure, its bound, until the horizon."""
    times: list[float] = []
    now, failures = start, 0
    end = start + schedule.horizon_s
    while now < end:
        failures += 1
        now = min(now + schedule.bound_s(failures), end)
        times.append(now)
    return times


async def test_failed_event_is_retried_on_schedule_until_dead_lettered_at_the_horizon(
    tmp_path: Path,
) -> None:
    start = 1_700_000_000.0
    clock = FakeClock(start)
    schedule = DeliverySchedule(max_backoff_s=6 * 3600.0)  # the 3-day default horizon
    environ = {RETRY_MAX_VAR: "21600", DELIVERY_SCAN_VAR: "0.02", **SETTLED}
    with receiving_webhooks() as receiver:
        receiver.status = 503
        async with notifier(tmp_path, environ, clock=clock, rng=lambda: 0.0) as service:
            sent = await service.send("evt_1", receiver.url())
            seen: list[float] = []
            current = sent
            while current.delivery_status == pb.DELIVERY_STATUS_PENDING:
                seen.append(_seconds(current.next_attempt_time))
                clock.now = seen[-1]
                attempts = current.attempt_count
                current = await eventually(
                    functools.partial(service.get, sent.notification_id),
                    functools.partial(_more_attempts_than, attempts),
                )
                assert current.attempt_count == attempts + 1, "no attempt at the due time"
            listed = await service.stub.ListNotifications(
                pb.ListNotificationsRequest(
                    merchant_id="m_1", delivery_status=pb.DELIVERY_STATUS_DEAD_LETTERED
                )
            )
    expected = _expected_attempt_times(start, schedule)
    assert seen == pytest.approx(expected, abs=1e-3)
    assert seen[:3] == pytest.approx([start + 10, start + 30, start + 70], abs=1e-3)
    assert current.delivery_status == pb.DELIVERY_STATUS_DEAD_LETTERED
    assert _seconds(current.dead_letter_time) == pytest.approx(start + 3 * 24 * 3600, abs=1e-3)
    assert not current.HasField("next_attempt_time")
    assert current.attempt_count == len(expected) + 1
    assert "503" in current.last_error
    assert [n.notification_id for n in listed.notifications] == [sent.notification_id]
    assert receiver.keys() == {sent.notification_id: current.attempt_count}


async def test_operator_redelivers_a_dead_lettered_event(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    environ = {RETRY_HORIZON_VAR: "60", DELIVERY_SCAN_VAR: "0.02", **SETTLED}
    with receiving_webhooks() as receiver:
        receiver.status = 503
        async with notifier(tmp_path, environ, clock=clock, rng=lambda: 0.0) as service:
            sent = await service.send("evt_1", receiver.url())
            clock.now += 3600  # past the 60 s horizon: the next attempt is the last
            dead = await service.settled(sent.notification_id, pb.DELIVERY_STATUS_DEAD_LETTERED)
            assert dead.delivery_status == pb.DELIVERY_STATUS_DEAD_LETTERED
            receiver.status = 200

            again = await service.redeliver("redeliver-1", sent.notification_id)
            assert again.delivery_status == pb.DELIVERY_STATUS_PENDING
            assert _seconds(again.next_attempt_time) == pytest.approx(clock.now, abs=1e-3)
            assert not again.HasField("dead_letter_time")
            final = await service.settled(sent.notification_id, pb.DELIVERY_STATUS_DELIVERED)
            replay = await service.redeliver("redeliver-1", sent.notification_id)
            with pytest.raises(aio.AioRpcError) as delivered:
                await service.redeliver("redeliver-2", sent.notification_id)
    assert final.attempt_count == dead.attempt_count + 1
    assert replay == again  # one request id, one new round
    assert delivered.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(delivered.value) == "INVALID_STATE"
    assert receiver.accepted_keys() == {sent.notification_id: 1}


async def test_redelivery_of_an_unknown_notification_is_not_found(tmp_path: Path) -> None:
    async with notifier(tmp_path, {}) as service:
        with pytest.raises(aio.AioRpcError) as caught:
            await service.redeliver("redeliver-1", "ntf_missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_redelivery_request_id_reused_for_another_notification_is_invalid_argument(
    tmp_path: Path,
) -> None:
    with receiving_webhooks() as receiver:
        receiver.status = 503
        async with notifier(tmp_path, SETTLED) as service:
            one = await service.send("evt_1", receiver.url())
            two = await service.send("evt_2", receiver.url())
            await service.redeliver("redeliver-1", one.notification_id)
            with pytest.raises(aio.AioRpcError) as caught:
                await service.redeliver("redeliver-1", two.notification_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


#: The notifications table as the version before the delivery schedule created it.
OLD_SCHEMA = """
CREATE TABLE notifications (
    notification_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    delivery_status INTEGER NOT NULL,
    attempt_count INTEGER NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    last_response_code INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_attempt_time REAL,
    create_time REAL NOT NULL
);
CREATE INDEX notifications_by_merchant
    ON notifications (merchant_id, create_time, notification_id);
"""
