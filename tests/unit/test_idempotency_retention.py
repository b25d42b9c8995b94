"""Idempotency records expire after the retention, purged by claims: real stores, both engines."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from paymesh.common.v1 import common_pb2
from paymesh.order.v1 import order_pb2
from paymesh.settlement.v1 import settlement_pb2
from services.mesh.errors import Aborted, AlreadyExists
from services.order.store import OrderStore
from services.settlement.store import SettlementStore
from services.storage import idempotency
from services.storage.sql import Database, Target, seconds_to_ns
from tests.unit.fakes import FakeClock

DAY_S = 24 * 3600.0
RETENTION = idempotency.Retention()
START = 1_700_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


@pytest.fixture
def orders(database_target: Callable[[str], Target], clock: FakeClock) -> Iterator[OrderStore]:
    store = OrderStore(database_target("order"), clock=clock)
    store.create(
        order_pb2.CreateOrderRequest(
            request_id="r_create",
            order_id="o_1",
            merchant_id="m_1",
            payment_id="pay_1",
            amount=common_pb2.Money(amount_minor=1250, currency_code="EUR"),
        )
    )
    yield store
    store.close()


def _status(
    request_id: str, status: order_pb2.OrderStatus.ValueType, reason: str = ""
) -> order_pb2.UpdateOrderStatusRequest:
    return order_pb2.UpdateOrderStatusRequest(
        request_id=request_id, order_id="o_1", status=status, reason=reason
    )


def _records(target: Target) -> list[tuple[str, str]]:
    reader = Database(target, idempotency.SCHEMA)
    try:
        rows = reader.all("SELECT request_id, state FROM idempotency_keys ORDER BY request_id")
        return [(row[0], row[1]) for row in rows]
    finally:
        reader.close()


def _claim_at(db: Database, request_id: str, now: float, *, done: bool = True) -> None:
    request = order_pb2.UpdateOrderStatusRequest(request_id=request_id, order_id=request_id)
    with db.transaction() as tx:
        idempotency.claim(
            tx, "Test", request_id, request, now_ns=seconds_to_ns(now), retention=RETENTION
        )
        if done:
            idempotency.complete(tx, "Test", request_id, order_pb2.UpdateOrderStatusResponse())


def test_default_retention_is_seven_days() -> None:
    assert idempotency.Retention.from_environ({}).retention_s == 7 * DAY_S


def test_retention_is_read_from_the_environment() -> None:
    environ = {idempotency.RETENTION_VAR: "172800"}
    assert idempotency.Retention.from_environ(environ).retention_s == 2 * DAY_S


@pytest.mark.parametrize("value", ["3600", "abc", "nan", "-1"])
def test_retention_below_a_day_or_not_a_number_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=idempotency.RETENTION_VAR):
        idempotency.Retention.from_environ({idempotency.RETENTION_VAR: value})


def test_replay_within_the_retention_returns_the_stored_response(
    orders: OrderStore, clock: FakeClock
) -> None:
    paid = orders.update_status(_status("r_paid", order_pb2.ORDER_STATUS_PAID))
    orders.update_status(_status("r_refund", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED))
    clock.advance(RETENTION.retention_s - 1)
    assert orders.update_status(_status("r_paid", order_pb2.ORDER_STATUS_PAID)) == paid
    assert orders.get("o_1").status == order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED


def test_replay_after_the_retention_is_a_new_request(orders: OrderStore, clock: FakeClock) -> None:
    # Statuses the lifecycle allows in any order: PARTIALLY_REFUNDED may be set again.
    orders.update_status(_status("r_paid", order_pb2.ORDER_STATUS_PAID))
    first = _status("r_first", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED, "first")
    orders.update_status(first)
    orders.update_status(_status("r_second", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED, "second"))
    clock.advance(RETENTION.retention_s + 1)
    again = orders.update_status(first)
    assert again.status_reason == "first"
    assert orders.get("o_1").status_reason == "first"  # executed again, not replayed


def test_id_reused_with_another_body_after_the_retention_is_accepted(
    orders: OrderStore, clock: FakeClock
) -> None:
    orders.update_status(_status("r_1", order_pb2.ORDER_STATUS_PAID))
    clock.advance(RETENTION.retention_s + 1)
    reused = orders.update_status(_status("r_1", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED, "late"))
    assert reused.status_reason == "late"


def test_claim_purges_finished_records_past_the_retention(
    database_target: Callable[[str], Target], orders: OrderStore, clock: FakeClock
) -> None:
    orders.update_status(_status("r_old", order_pb2.ORDER_STATUS_PAID))
    clock.advance(2 * DAY_S)
    orders.update_status(_status("r_recent", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED))
    clock.advance(RETENTION.retention_s - DAY_S)
    orders.update_status(_status("r_now", order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED))
    assert _records(database_target("order")) == [("r_now", "done"), ("r_recent", "done")]


def test_purge_runs_at_most_once_per_interval(database_target: Callable[[str], Target]) -> None:
    conn = Database(database_target("keys"), idempotency.SCHEMA)
    _claim_at(conn, "a", START)
    _claim_at(conn, "b", START + 1)
    now = START + RETENTION.retention_s + 10
    _claim_at(conn, "c", now)  # purges a and b
    _claim_at(conn, "d", now + 1)
    with conn.transaction() as tx:  # d expires at once, but the next purge is not due yet
        tx.update("idempotency_keys", {"create_time_ns": seconds_to_ns(START)}, request_id="d")
    _claim_at(conn, "e", now + RETENTION.purge_interval_s - 1)
    assert [r for r, _ in _records(database_target("keys"))] == ["c", "d", "e"]
    _claim_at(conn, "f", now + RETENTION.purge_interval_s)
    assert [r for r, _ in _records(database_target("keys"))] == ["c", "e", "f"]


def test_purge_deletes_one_batch_per_claim_until_none_are_left(
    database_target: Callable[[str], Target],
) -> None:
    conn = Database(database_target("keys"), idempotency.SCHEMA)
    retention = idempotency.Retention(purge_batch=2)
    for index in range(5):
        _claim_at(conn, f"old{index}", START)
    now = seconds_to_ns(START + retention.retention_s + 1)
    with conn.transaction() as tx:
        deleted = [idempotency.purge_expired(tx, now_ns=now, retention=retention) for _ in range(4)]
    assert deleted == [2, 2, 1, 0]


def test_in_flight_records_never_expire(database_target: Callable[[str], Target]) -> None:
    conn = Database(database_target("keys"), idempotency.SCHEMA)
    _claim_at(conn, "work", START, done=False)
    later = START + 10 * RETENTION.retention_s
    with conn.transaction() as tx:
        purged = idempotency.purge_expired(
            tx, now_ns=seconds_to_ns(later), retention=RETENTION, force=True
        )
        assert purged == 0
    with pytest.raises(Aborted):
        _claim_at(conn, "work", later)


def test_kept_work_of_an_expired_request_id_is_already_exists(
    database_target: Callable[[str], Target],
) -> None:
    clock_ns = FakeClock(start=START * 1e9)
    store = SettlementStore(database_target("settlement"), clock_ns=lambda: int(clock_ns()))
    request = settlement_pb2.CreateSettlementRequest(
        request_id="r_settle",
        merchant_id="m_1",
        currency_code="EUR",
        bank_account_reference="DE89",
    )
    begun = store.begin(request, "stl_1", 100, running=lambda _: False)
    store.settle_claim(begun.record)
    clock_ns.advance((RETENTION.retention_s + 1) * 1e9)
    with pytest.raises(AlreadyExists, match="send a new request_id"):
        store.begin(request, "stl_1", 100, running=lambda _: False)
    store.close()
