"""The outbox relay against scripted destinations: delivery, backoff, refusals, isolation."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc import aio

from interceptors.errors import from_grpc_error
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2
from services.mesh.errors import Aborted, InvalidArgument, ServiceError, service_error_status
from services.payment_gateway.outbox import (
    PENDING,
    REFUSED,
    SCHEMA,
    SENT,
    BatchRoute,
    Outbox,
    OutboxMessage,
    OutboxRelay,
    OutboxRow,
    RelayPolicy,
    Route,
)
from services.storage import leases
from services.storage.sql import Database, seconds_to_ns
from tests.unit.fakes import FakeClock

NOTIFY = "/test.Notifications/Send"
ANALYTICS = "/test.Analytics/Record"


class Destination:
    """A destination that answers with the codes it is told, then OK; records what it got."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.failures: list[grpc.StatusCode] = []
        self.hang = False

    async def send(self, request: Message) -> object:
        assert isinstance(request, notification_pb2.SendNotificationRequest)
        if self.hang:
            await asyncio.Event().wait()
        if self.failures:
            code = self.failures.pop(0)
            raise from_grpc_error(
                aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), f"scripted {code.name}")
            )
        self.received.append(request.request_id)
        return object()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=time.time())


class CountingOutbox(Outbox):
    """An outbox that counts how often a worker looked for due rows."""

    def __init__(self, db: Database, *, clock: FakeClock) -> None:
        super().__init__(db, clock=clock)
        self.db = db
        self.looks = 0

    def due(self, target: str, *, limit: int) -> list[OutboxRow]:
        self.looks += 1
        return super().due(target, limit=limit)


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[CountingOutbox]:
    db = Database(tmp_path / "outbox.db", SCHEMA)
    yield CountingOutbox(db, clock=clock)
    db.close()


async def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def _message(event_id: str, method: str = NOTIFY, *, missing_ok: bool = False) -> OutboxMessage:
    target = "notifications" if method == NOTIFY else "analytics"
    return OutboxMessage(
        event_id=event_id,
        target=target,
        method=method,
        request=notification_pb2.SendNotificationRequest(request_id=event_id, merchant_id="m_1"),
        missing_ok=missing_ok,
    )


def _write(outbox: CountingOutbox, *messages: OutboxMessage) -> None:
    with outbox.db.transaction() as tx:
        outbox.add(tx, "pay_1", messages)


def _relay(
    outbox: CountingOutbox,
    clock: FakeClock,
    *destinations: tuple[str, Destination],
    lease_table: leases.Leases | None = None,
    **policy: float,
) -> OutboxRelay:
    routes = {
        method: Route(
            "notifications" if method == NOTIFY else "analytics",
            notification_pb2.SendNotificationRequest,
            destination.send,
        )
        for method, destination in destinations
    }
    return OutboxRelay(
        outbox,
        routes,
        policy=RelayPolicy(**policy),  # type: ignore[arg-type]  # numbers of the test
        clock=clock,
        rng=lambda: 1.0,  # the jitter's upper bound: the backoff is exact
        leases=lease_table,
    )


async def test_due_rows_are_sent_in_order_and_marked_sent_once(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    _write(outbox, _message("evt_1"), _message("evt_2"))
    relay = _relay(outbox, clock, (NOTIFY, destination))
    await relay.deliver_due("notifications")
    await relay.deliver_due("notifications")
    assert destination.received == ["evt_1", "evt_2"]
    assert [(r.state, r.attempts) for r in outbox.rows()] == [(SENT, 1), (SENT, 1)]


async def test_a_pass_marks_its_delivered_rows_in_one_write_and_looks_once(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    _write(outbox, _message("evt_1"), _message("evt_2"), _message("evt_3"))
    writes: list[str] = []
    outbox.db._sqlite.set_trace_callback(
        lambda sql: writes.append(sql) if sql.startswith("UPDATE outbox") else None
    )
    relay = _relay(outbox, clock, (NOTIFY, destination))
    await relay.deliver_due("notifications")
    outbox.db._sqlite.set_trace_callback(None)
    assert destination.received == ["evt_1", "evt_2", "evt_3"]
    assert [r.state for r in outbox.rows()] == [SENT, SENT, SENT]
    assert len(writes) == 1
    assert outbox.looks == 1  # a batch shorter than the limit was every due row


async def test_rows_sent_before_a_failure_are_marked_and_a_crash_before_marking_resends(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    class SecondFails(Destination):
        async def send(self, request: Message) -> object:
            if len(self.received) == 1:
                self.failures = [grpc.StatusCode.UNAVAILABLE]
            return await super().send(request)

    _write(outbox, _message("evt_1"), _message("evt_2"))
    relay = _relay(outbox, clock, (NOTIFY, SecondFails()))
    await relay.deliver_due("notifications")
    assert [r.state for r in outbox.rows()] == [SENT, PENDING]  # the first is kept as sent

    # A relay that dies mid-batch (cancelled during a send) has marked nothing of it: the
    # next one sends those rows again (at least once; the destination dedupes by event id).
    _write(outbox, _message("evt_3"))
    hung = Destination()
    hung.hang = True
    dying = _relay(outbox, clock, (NOTIFY, hung))
    clock.advance(60)
    task = asyncio.ensure_future(dying.deliver_due("notifications"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.state for r in outbox.rows()] == [SENT, PENDING, PENDING]
    again = Destination()
    await _relay(outbox, clock, (NOTIFY, again)).deliver_due("notifications")
    assert again.received == ["evt_2", "evt_3"]
    assert [r.state for r in outbox.rows()] == [SENT, SENT, SENT]


def test_a_message_written_twice_is_one_row(outbox: CountingOutbox) -> None:
    _write(outbox, _message("evt_1"))
    _write(outbox, _message("evt_1"))
    assert len(outbox.rows()) == 1


async def test_failing_destination_is_retried_with_doubling_backoff_and_paused_meanwhile(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    destination.failures = [grpc.StatusCode.UNAVAILABLE] * 3
    _write(outbox, _message("evt_1"), _message("evt_2"))
    relay = _relay(outbox, clock, (NOTIFY, destination), initial_backoff_s=1.0, max_backoff_s=3.0)

    waits = []
    for _ in range(3):
        waits.append(await relay.deliver_due("notifications"))
        head, behind = outbox.rows()
        # Only the head was tried: a destination that is down sees one attempt per pause.
        assert (head.state, behind.attempts) == (PENDING, 0)
        assert head.last_error == "UNAVAILABLE: scripted UNAVAILABLE"
        assert head.next_attempt_time == pytest.approx(clock() + waits[-1])
        assert await relay.deliver_due("notifications") == pytest.approx(waits[-1])  # paused
        clock.advance(waits[-1])
    assert waits == pytest.approx([1.0, 2.0, 3.0])  # doubling, capped at max_backoff_s
    assert outbox.rows()[0].attempts == 3
    await relay.deliver_due("notifications")
    assert destination.received == ["evt_1", "evt_2"]
    assert [r.state for r in outbox.rows()] == [SENT, SENT]


async def test_the_backoff_starts_over_once_the_destination_answers(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    destination.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    _write(outbox, _message("evt_1"))
    relay = _relay(outbox, clock, (NOTIFY, destination), initial_backoff_s=1.0)
    clock.advance(await relay.deliver_due("notifications"))
    clock.advance(await relay.deliver_due("notifications"))
    await relay.deliver_due("notifications")
    destination.failures = [grpc.StatusCode.UNAVAILABLE]
    _write(outbox, _message("evt_2"))
    assert await relay.deliver_due("notifications") == pytest.approx(1.0)


async def test_a_definite_refusal_is_kept_as_refused_and_not_sent_again(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    destination.failures = [grpc.StatusCode.INVALID_ARGUMENT]
    _write(outbox, _message("evt_1"), _message("evt_2"))
    relay = _relay(outbox, clock, (NOTIFY, destination))
    await relay.deliver_due("notifications")
    await relay.deliver_due("notifications")
    refused, sent = outbox.rows()
    assert (refused.state, refused.last_error) == (
        REFUSED,
        "INVALID_ARGUMENT: scripted INVALID_ARGUMENT",
    )
    assert sent.state == SENT
    assert destination.received == ["evt_2"]
    assert outbox.summary() == {"pending": {}, "refused": 1}


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL])
async def test_a_misconfiguration_or_fault_is_retried_not_lost(
    outbox: CountingOutbox, clock: FakeClock, code: grpc.StatusCode
) -> None:
    destination = Destination()
    destination.failures = [code]
    _write(outbox, _message("evt_1"))
    relay = _relay(outbox, clock, (NOTIFY, destination))
    clock.advance(await relay.deliver_due("notifications"))
    await relay.deliver_due("notifications")
    assert destination.received == ["evt_1"]


async def test_already_exists_and_a_missing_ok_not_found_count_as_delivered(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    destination.failures = [grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND]
    _write(outbox, _message("evt_1"), _message("evt_2", missing_ok=True))
    relay = _relay(outbox, clock, (NOTIFY, destination))
    await relay.deliver_due("notifications")
    assert [r.state for r in outbox.rows()] == [SENT, SENT]


async def test_a_hung_destination_delays_no_other_destination(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    hung, analytics = Destination(), Destination()
    hung.hang = True
    _write(outbox, _message("evt_1"), _message("evt_1", ANALYTICS))
    relay = _relay(outbox, clock, (NOTIFY, hung), (ANALYTICS, analytics), interval_s=3600)
    worker = asyncio.create_task(relay.run_forever())
    try:
        await _until(lambda: bool(analytics.received))
        assert analytics.received == ["evt_1"]
        assert [r.state for r in outbox.rows()] == [PENDING, SENT]
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_a_kick_wakes_a_worker_long_before_its_interval(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    relay = _relay(outbox, clock, (NOTIFY, destination), interval_s=3600)
    worker = asyncio.create_task(relay.run_forever())
    try:
        await _until(lambda: outbox.looks > 0)  # it found nothing and sleeps for an hour
        _write(outbox, _message("evt_1"))
        relay.kick()
        await _until(lambda: bool(destination.received))
        assert destination.received == ["evt_1"]
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_delivered_rows_are_purged_after_the_retention(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    _write(outbox, _message("evt_1"))
    relay = _relay(outbox, clock, (NOTIFY, destination), retention_s=100, purge_interval_s=0)
    await relay.deliver_due("notifications")
    _write(outbox, _message("evt_2", ANALYTICS))  # no worker sends it: it stays pending
    clock.advance(101)
    await relay.deliver_due("notifications")
    assert [r.event_id for r in outbox.rows()] == ["evt_2"]


def test_summary_shows_what_waits_per_destination(outbox: CountingOutbox, clock: FakeClock) -> None:
    _write(outbox, _message("evt_1"), _message("evt_2"))
    (row, _) = outbox.rows()
    outbox.retry_later(row.seq, at=clock() + 5, error="UNAVAILABLE: down")
    pending = outbox.summary()["pending"]["notifications"]
    assert (pending["pending"], pending["max_attempts"], pending["last_error"]) == (
        2,
        1,
        "UNAVAILABLE: down",
    )


def test_relay_policy_defaults_are_safe_and_bad_values_refused() -> None:
    policy = RelayPolicy()
    assert (policy.interval_s, policy.initial_backoff_s, policy.max_backoff_s) == (5.0, 0.5, 60.0)
    assert policy.retention_s == 7 * 24 * 3600
    assert (policy.batch_items, policy.batch_bytes) == (64, 192 * 1024)
    for bad in (
        {"interval_s": 0},
        {"max_backoff_s": 0.1},
        {"batch": 0},
        {"retention_s": -1},
        {"batch_items": 0},
        {"batch_items": 65},
        {"batch_bytes": 0},
    ):
        with pytest.raises(ValueError):
            RelayPolicy(**bad)


async def test_of_two_replicas_only_the_lease_holder_sends_until_its_lease_runs_out(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Two gateway replicas on one database file, each with its connection and its relay.
    def replica(owner: str) -> tuple[CountingOutbox, OutboxRelay]:
        db = Database(
            tmp_path / "gateway.db", SCHEMA + leases.SCHEMA, clock_ns=lambda: seconds_to_ns(clock())
        )
        box = CountingOutbox(db, clock=clock)
        lease_table = leases.Leases(db, owner, lease_s=10)
        return box, _relay(box, clock, (NOTIFY, destination), lease_table=lease_table)

    destination = Destination()
    first_box, first = replica("gateway@a")
    _, second = replica("gateway@b")
    _write(first_box, _message("evt_1"))
    await first.deliver_due("notifications")
    _write(first_box, _message("evt_2"))
    await second.deliver_due("notifications")  # a's lease: b leaves the row alone
    assert destination.received == ["evt_1"]
    clock.advance(11)  # a died: its lease runs out unrenewed
    await second.deliver_due("notifications")
    assert destination.received == ["evt_1", "evt_2"]
    await first.deliver_due("notifications")  # a, back, finds b holding it
    assert destination.received == ["evt_1", "evt_2"]


async def test_the_holder_writes_its_lease_once_a_third_of_the_period_however_often_it_looks(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = Database(
        tmp_path / "gateway.db", SCHEMA + leases.SCHEMA, clock_ns=lambda: seconds_to_ns(clock())
    )
    box = CountingOutbox(db, clock=clock)
    relay = _relay(
        box, clock, (NOTIFY, Destination()), lease_table=leases.Leases(db, "gw", lease_s=9)
    )

    def lease_until() -> int:
        row = db.one("SELECT until_ns FROM leases WHERE lease_key = 'outbox/notifications'")
        assert row is not None
        return int(row["until_ns"])

    await relay.deliver_due("notifications")
    first = lease_until()
    for _ in range(20):  # commits wake the worker again and again within the same 3 s
        clock.advance(0.1)
        await relay.deliver_due("notifications")
    assert lease_until() == first
    clock.advance(1.1)  # 3.1 s since the claim: past a third of the 9 s period
    await relay.deliver_due("notifications")
    assert lease_until() - first == pytest.approx(seconds_to_ns(3.1), abs=100_000)


class BatchDestination:
    """A batch destination: answers each item APPLIED, or FAILED with the code it is told for
    that request id; records each call's request ids."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.item_errors: dict[str, ServiceError] = {}

    async def send(self, request: notification_pb2.SendNotificationsRequest) -> Any:
        self.calls.append([n.request_id for n in request.notifications])
        results = []
        for item in request.notifications:
            error = self.item_errors.pop(item.request_id, None)
            if error is None:
                results.append(
                    notification_pb2.SendNotificationResult(
                        outcome=common_pb2.BATCH_ITEM_OUTCOME_APPLIED
                    )
                )
            else:
                status = service_error_status(error, domain="notifications")
                results.append(
                    notification_pb2.SendNotificationResult(
                        outcome=common_pb2.BATCH_ITEM_OUTCOME_FAILED,
                        error=common_pb2.BatchItemStatus.FromString(status.SerializeToString()),
                    )
                )
        return notification_pb2.SendNotificationsResponse(results=results)


def _batch_relay(
    outbox: CountingOutbox,
    clock: FakeClock,
    single: Destination,
    send_batch: Callable[[Any], Any],
    **policy: float,
) -> OutboxRelay:
    route = Route(
        "notifications",
        notification_pb2.SendNotificationRequest,
        single.send,
        BatchRoute(
            lambda items: notification_pb2.SendNotificationsRequest(notifications=items),
            send_batch,
        ),
    )
    return OutboxRelay(
        outbox,
        {NOTIFY: route},
        policy=RelayPolicy(**policy),  # type: ignore[arg-type]  # numbers of the test
        clock=clock,
        rng=lambda: 1.0,
    )


async def test_rows_with_a_batch_route_go_in_calls_of_at_most_batch_items_and_bytes(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    single, batch = Destination(), BatchDestination()
    _write(outbox, *(_message(f"evt_{i}") for i in range(7)))
    relay = _batch_relay(outbox, clock, single, batch.send, batch_items=3)
    await relay.deliver_due("notifications")
    assert batch.calls == [["evt_0", "evt_1", "evt_2"], ["evt_3", "evt_4", "evt_5"]]
    assert single.received == ["evt_6"]  # a call of one row is the single RPC
    assert {r.state for r in outbox.rows()} == {SENT}

    _write(outbox, *(_message(f"evt_b{i}") for i in range(4)))
    size = len(outbox.rows(state=PENDING)[0].request)  # each row's, all of one size
    batch.calls.clear()
    relay = _batch_relay(outbox, clock, single, batch.send, batch_bytes=2 * size + 1)
    await relay.deliver_due("notifications")
    assert batch.calls == [["evt_b0", "evt_b1"], ["evt_b2", "evt_b3"]]


async def test_commits_soon_after_a_pass_gather_into_one_batch_call(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    single, batch = Destination(), BatchDestination()
    relay = _batch_relay(outbox, clock, single, batch.send, interval_s=3600, gather_s=1.0)
    worker = asyncio.create_task(relay.run_forever())
    try:
        await _until(lambda: outbox.looks > 0)  # nothing yet: it waits for a commit
        _write(outbox, _message("evt_0"))
        relay.kick()
        await _until(lambda: single.received == ["evt_0"])  # a quiet destination: at once
        for i in range(1, 4):  # three commits within the gather window of that pass
            _write(outbox, _message(f"evt_{i}"))
            relay.kick()
        await _until(lambda: bool(batch.calls))
        assert batch.calls == [["evt_1", "evt_2", "evt_3"]]
        assert outbox.looks == 3  # the empty one, evt_0's, and the gathered rows'
        assert {r.state for r in outbox.rows()} == {SENT}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


@pytest.mark.parametrize("gather_s", [-0.1, math.nan, 3601.0])
def test_the_gather_window_is_from_0_to_the_interval(gather_s: float) -> None:
    with pytest.raises(ValueError, match="gather_s"):
        RelayPolicy(interval_s=3600, gather_s=gather_s)


async def test_each_row_of_a_batch_is_marked_by_its_own_result(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    single, batch = Destination(), BatchDestination()
    _write(outbox, *(_message(f"evt_{i}") for i in range(4)))
    batch.item_errors = {
        "evt_1": InvalidArgument("scripted"),  # refused for good
        "evt_2": Aborted("scripted"),  # retried later
    }
    relay = _batch_relay(outbox, clock, single, batch.send)
    await relay.deliver_due("notifications")
    assert [(r.event_id, r.state, r.attempts) for r in outbox.rows()] == [
        ("evt_0", SENT, 1),
        ("evt_1", REFUSED, 1),
        ("evt_2", PENDING, 1),
        ("evt_3", SENT, 1),
    ]
    assert outbox.rows()[2].next_attempt_time == clock() + 0.5
    clock.advance(0.5)
    await relay.deliver_due("notifications")
    assert single.received == ["evt_2"]  # alone now: the single RPC
    assert {r.state for r in outbox.rows() if r.event_id != "evt_1"} == {SENT}


async def test_a_batch_call_failing_whole_pauses_once_and_keeps_every_row(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    single = Destination()
    _write(outbox, *(_message(f"evt_{i}") for i in range(3)))

    async def down(request: Message) -> Any:
        raise from_grpc_error(
            aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "down")
        )

    relay = _batch_relay(outbox, clock, single, down)
    wait_s = await relay.deliver_due("notifications")
    assert wait_s == 0.5
    assert [(r.state, r.attempts, r.next_attempt_time) for r in outbox.rows()] == [
        (PENDING, 1, clock() + 0.5)
    ] * 3


async def test_a_pass_after_nothing_was_left_pending_skips_the_next_attempt_look(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    relay = _relay(outbox, clock, (NOTIFY, destination), initial_backoff_s=1.0, interval_s=5.0)
    nexts: list[float | None] = []
    real_next = outbox.next_attempt_time

    def next_attempt_time(target: str) -> float | None:
        nexts.append(real_next(target))
        return nexts[-1]

    outbox.next_attempt_time = next_attempt_time  # type: ignore[method-assign]  # counted
    assert await relay.deliver_due("notifications") == 5.0
    assert nexts == [None]  # the first pass looks: rows put off earlier may be pending
    _write(outbox, _message("evt_1"))
    assert await relay.deliver_due("notifications") == 5.0
    assert nexts == [None]  # every row it found was sent, none put off: no second look
    destination.failures = [grpc.StatusCode.UNAVAILABLE]
    _write(outbox, _message("evt_2"))
    assert await relay.deliver_due("notifications") == pytest.approx(1.0)  # paused
    clock.advance(0.5)
    _write(outbox, _message("evt_3"))
    assert await relay.deliver_due("notifications") == pytest.approx(0.5)  # still paused
    clock.advance(0.5)
    assert await relay.deliver_due("notifications") == 5.0
    assert destination.received == ["evt_1", "evt_2", "evt_3"]
    assert nexts == [None, None]  # after the put-off row the relay looked again


async def test_a_row_put_off_by_another_relay_of_the_outbox_is_looked_for(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    relay = _relay(outbox, clock, (NOTIFY, destination), interval_s=5.0)
    assert await relay.deliver_due("notifications") == 5.0
    _write(outbox, _message("evt_1"))
    (row,) = outbox.rows()
    outbox.retry_later(row.seq, at=clock() + 2.0, error="UNAVAILABLE: elsewhere")
    assert await relay.deliver_due("notifications") == pytest.approx(2.0)
    clock.advance(2.0)
    assert await relay.deliver_due("notifications") == 5.0
    assert destination.received == ["evt_1"]


async def test_a_worker_wakes_by_its_timer_when_nobody_kicks_it(
    outbox: CountingOutbox, clock: FakeClock
) -> None:
    destination = Destination()
    relay = _relay(outbox, clock, (NOTIFY, destination), interval_s=0.05, gather_s=0)
    worker = asyncio.create_task(relay.run_forever())
    try:
        await _until(lambda: outbox.looks > 0)
        _write(outbox, _message("evt_1"))  # no kick: the timer's next pass finds it
        await _until(lambda: bool(destination.received))
        await _until(lambda: outbox.looks > 3)  # and it keeps passing on its timer
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
