"""payment-gateway's store and request checks: claims, replays, refund reservations, bad input,
and the outbox rows its transactions write."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2
from paymesh.order.v1 import order_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.mesh import validation as v
from services.mesh.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.payment_gateway import store as store_module
from services.payment_gateway.servicer import (
    for_merchant,
    scoped_key,
    validate_create,
    validate_refund,
)
from services.payment_gateway.store import NewPayment, PaymentRecord, PaymentStore, Step
from tests.unit.fakes import FakeClock


def _request(**overrides: object) -> pg.CreatePaymentRequest:
    request = pg.CreatePaymentRequest(
        request_id="r1",
        merchant_id="m_1",
        amount=common_pb2.Money(amount_minor=1000, currency_code="EUR"),
        payment_method_token="tok_visa",
        customer_ip="192.0.2.10",
        customer_country_code="DE",
    )
    for name, value in overrides.items():
        if isinstance(value, common_pb2.Money):
            request.amount.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def _new(request: pg.CreatePaymentRequest) -> NewPayment:
    return NewPayment(
        merchant_id=request.merchant_id,
        amount=request.amount,
        settlement_currency_code=request.settlement_currency_code,
        payment_method_token=request.payment_method_token,
        customer_ip=request.customer_ip,
        customer_country_code=request.customer_country_code,
        description=request.description,
        merchant_order_reference=request.merchant_order_reference,
        webhook_url="",
    )


@pytest.fixture
def store(tmp_path: Path) -> PaymentStore:
    return PaymentStore(tmp_path / "gateway.db")


def _begin(store: PaymentStore, request: pg.CreatePaymentRequest) -> PaymentRecord:
    started = store.begin_payment(
        scoped_key(request.merchant_id, request.request_id),
        for_merchant(request, request.merchant_id),
        _new(request),
    )
    assert isinstance(started, PaymentRecord)
    return started


def _succeeded(store: PaymentStore, captured: int = 1000, settled: int = 1000) -> PaymentRecord:
    payment = _begin(store, _request())
    store.advance(
        payment.payment_id,
        Step.POSTED,
        captured_minor=captured,
        settlement_minor=settled,
        charge_id="ch_1",
    )
    store.finish(payment.payment_id, pg.PAYMENT_STATUS_SUCCEEDED)
    return store.payment(payment.payment_id)


def test_new_payment_is_pending_at_the_first_step(store: PaymentStore) -> None:
    payment = _begin(store, _request())
    assert (payment.status, payment.step) == (pg.PAYMENT_STATUS_PENDING, Step.CREATED)
    assert store.unfinished_payments() == [payment.payment_id]


def test_duplicate_while_in_flight_is_aborted_and_writes_nothing(store: PaymentStore) -> None:
    _begin(store, _request())
    with pytest.raises(Aborted) as caught:
        _begin(store, _request())
    assert caught.value.reason == "IDEMPOTENCY_KEY_IN_FLIGHT"
    assert len(store.unfinished_payments()) == 1


def test_finished_payment_is_replayed_with_its_final_response(store: PaymentStore) -> None:
    payment = _succeeded(store)
    replay = store.begin_payment(
        scoped_key("m_1", "r1"), for_merchant(_request(), "m_1"), _new(_request())
    )
    assert isinstance(replay, pg.CreatePaymentResponse)
    assert replay.payment.payment_id == payment.payment_id
    assert replay.payment.status == pg.PAYMENT_STATUS_SUCCEEDED


def test_replay_that_leaves_the_merchant_id_empty_is_the_same_request(
    store: PaymentStore,
) -> None:
    _succeeded(store)
    implicit = _request(merchant_id="")
    replay = store.begin_payment(
        scoped_key("m_1", "r1"), for_merchant(implicit, "m_1"), _new(_request())
    )
    assert isinstance(replay, pg.CreatePaymentResponse)


def test_same_request_id_with_another_body_is_invalid_argument(store: PaymentStore) -> None:
    _begin(store, _request())
    other = _request(description="something else")
    with pytest.raises(InvalidArgument) as caught:
        store.begin_payment(scoped_key("m_1", "r1"), for_merchant(other, "m_1"), _new(other))
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"


def test_request_ids_of_two_merchants_do_not_collide(store: PaymentStore) -> None:
    first = _begin(store, _request())
    second = _begin(store, _request(merchant_id="m_2"))
    assert first.payment_id != second.payment_id


def test_refund_reserves_the_amount_while_pending(store: PaymentStore) -> None:
    payment = _succeeded(store)
    refund_request = pg.RefundPaymentRequest(request_id="rf1", payment_id=payment.payment_id)
    first = store.begin_refund(
        "m_1/rf1", refund_request, payment_id=payment.payment_id, amount_minor=600, reason=""
    )
    assert not isinstance(first, pg.RefundPaymentResponse)
    second_request = pg.RefundPaymentRequest(request_id="rf2", payment_id=payment.payment_id)
    with pytest.raises(FailedPrecondition) as caught:
        store.begin_refund(
            "m_1/rf2", second_request, payment_id=payment.payment_id, amount_minor=500, reason=""
        )
    assert caught.value.reason == "REFUND_EXCEEDS_CAPTURED"


def test_failed_refund_releases_its_reservation(store: PaymentStore) -> None:
    payment = _succeeded(store)
    refund = store.begin_refund(
        "m_1/rf1",
        pg.RefundPaymentRequest(request_id="rf1"),
        payment_id=payment.payment_id,
        amount_minor=None,
        reason="",
    )
    assert not isinstance(refund, pg.RefundPaymentResponse)
    assert refund.amount_minor == 1000
    store.finish_refund(refund.refund_id, pg.REFUND_STATUS_FAILED, failure_reason="X")
    again = store.begin_refund(
        "m_1/rf2",
        pg.RefundPaymentRequest(request_id="rf2"),
        payment_id=payment.payment_id,
        amount_minor=1000,
        reason="",
    )
    assert not isinstance(again, pg.RefundPaymentResponse)


def test_succeeded_refunds_move_the_payment_to_refunded(store: PaymentStore) -> None:
    payment = _succeeded(store, captured=1000, settled=900)
    statuses = []
    for index, amount in enumerate((400, 600)):
        refund = store.begin_refund(
            f"m_1/rf{index}",
            pg.RefundPaymentRequest(request_id=f"rf{index}"),
            payment_id=payment.payment_id,
            amount_minor=amount,
            reason="",
        )
        assert not isinstance(refund, pg.RefundPaymentResponse)
        statuses.append(store.finish_refund(refund.refund_id, pg.REFUND_STATUS_SUCCEEDED).payment)
    assert [p.status for p in statuses] == [
        pg.PAYMENT_STATUS_PARTIALLY_REFUNDED,
        pg.PAYMENT_STATUS_REFUNDED,
    ]
    final = store.payment(payment.payment_id)
    assert (final.refunded_minor, final.settlement_refunded_minor) == (1000, 900)


def test_refund_of_a_pending_payment_is_invalid_state(store: PaymentStore) -> None:
    payment = _begin(store, _request())
    with pytest.raises(FailedPrecondition) as caught:
        store.begin_refund(
            "m_1/rf1",
            pg.RefundPaymentRequest(request_id="rf1"),
            payment_id=payment.payment_id,
            amount_minor=None,
            reason="",
        )
    assert caught.value.reason == "INVALID_STATE"


def test_unknown_payment_is_payment_not_found(store: PaymentStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.payment("pay_missing")
    assert caught.value.reason == "PAYMENT_NOT_FOUND"


def test_payment_of_another_merchant_is_the_not_found_of_a_missing_one(
    store: PaymentStore,
) -> None:
    payment = _begin(store, _request())
    with pytest.raises(NotFound) as foreign:
        store.payment(payment.payment_id, merchant_id="m_2")
    with pytest.raises(NotFound) as missing:
        store.payment("pay_missing", merchant_id="m_2")

    def shape(error: NotFound, payment_id: str) -> tuple[object, ...]:
        masked = {k: v.replace(payment_id, "<id>") for k, v in error.metadata.items()}
        return (error.message.replace(payment_id, "<id>"), error.reason, masked)

    assert shape(foreign.value, payment.payment_id) == shape(missing.value, "pay_missing")
    assert store.payment(payment.payment_id, merchant_id="m_1") == payment


def test_summary_counts_statuses_and_totals_per_currency(store: PaymentStore) -> None:
    _succeeded(store)
    _begin(
        store,
        _request(request_id="r2", amount=common_pb2.Money(amount_minor=5, currency_code="JPY")),
    )
    summary = store.summary("m_1")
    assert summary.payment_count == 2
    counts = {c.status: c.count for c in summary.status_counts}
    assert counts == {pg.PAYMENT_STATUS_SUCCEEDED: 1, pg.PAYMENT_STATUS_PENDING: 1}
    totals = {t.currency_code: t.captured.amount_minor for t in summary.currency_totals}
    assert totals == {"EUR": 1000, "JPY": 0}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("request_id", "", "VALIDATION_FAILED"),
        ("request_id", "has space", "VALIDATION_FAILED"),
        ("payment_method_token", "", "VALIDATION_FAILED"),
        ("customer_ip", "999.1.1.1", "VALIDATION_FAILED"),
        ("customer_country_code", "Germany", "VALIDATION_FAILED"),
        ("settlement_currency_code", "XXX", "CURRENCY_UNSUPPORTED"),
        ("description", "d" * 501, "VALIDATION_FAILED"),
        ("merchant_order_reference", "r" * 129, "VALIDATION_FAILED"),
    ],
)
def test_bad_create_field_is_invalid_argument(field: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_create(_request(**{field: value}))
    assert caught.value.reason == reason
    assert caught.value.field_violations[0].field == field


@pytest.mark.parametrize(
    ("amount", "currency"), [(0, "EUR"), (-5, "EUR"), (10**12 + 1, "EUR"), (100, "XYZ")]
)
def test_bad_amount_is_invalid_argument(amount: int, currency: str) -> None:
    request = _request()
    request.amount.amount_minor = amount
    request.amount.currency_code = currency
    with pytest.raises(InvalidArgument) as caught:
        validate_create(request)
    assert caught.value.reason in {"AMOUNT_INVALID", "CURRENCY_UNSUPPORTED"}


def test_missing_amount_is_invalid_argument() -> None:
    request = _request()
    request.ClearField("amount")
    with pytest.raises(InvalidArgument):
        validate_create(request)


def test_refund_with_zero_amount_is_invalid_argument() -> None:
    request = pg.RefundPaymentRequest(
        request_id="r1",
        payment_id="pay_1",
        amount=common_pb2.Money(amount_minor=0, currency_code="EUR"),
    )
    with pytest.raises(InvalidArgument):
        validate_refund(request)


# --- the outbox ---------------------------------------------------------------------------


def _announced(store: PaymentStore, flow_id: str) -> list[tuple[str, str]]:
    return [(r.event_id, r.target) for r in store.outbox.rows(flow_id=flow_id)]


def test_a_terminal_payment_writes_its_announcements_with_its_status(store: PaymentStore) -> None:
    payment = _succeeded(store)
    evt = f"evt_{payment.payment_id}_payment.succeeded"
    assert _announced(store, payment.payment_id) == [
        (evt, "notification-service"),
        (evt, "analytics-service"),
    ]
    webhook = notification_pb2.SendNotificationRequest.FromString(
        store.outbox.rows(flow_id=payment.payment_id)[0].request
    )
    assert webhook.request_id == evt
    assert json.loads(webhook.payload_json)["event_id"] == evt
    v.require_request_id("request_id", evt)  # a valid id at every destination


def test_a_declined_payment_with_an_order_also_cancels_the_order(store: PaymentStore) -> None:
    payment = _begin(store, _request())
    store.advance(payment.payment_id, Step.ORDERED, order_id="ord_1")
    store.finish(payment.payment_id, pg.PAYMENT_STATUS_DECLINED, decline_reason="CHANNEL_DECLINED")
    evt = f"evt_{payment.payment_id}_payment.declined"
    assert (evt, "order-service") in _announced(store, payment.payment_id)
    assert store.outbox.rows()[-1].missing_ok == 0


def test_status_and_announcements_commit_together_or_not_at_all(
    store: PaymentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    payment = _begin(store, _request())

    def broken(record: PaymentRecord) -> list[Any]:
        raise RuntimeError("the process dies between the status and its announcement")

    monkeypatch.setattr(store_module, "payment_events", broken)
    with pytest.raises(RuntimeError):
        store.finish(payment.payment_id, pg.PAYMENT_STATUS_SUCCEEDED)
    assert store.payment(payment.payment_id).step == Step.CREATED
    assert store.outbox.rows() == []
    with pytest.raises(Aborted):  # the claim is still in flight, not completed
        _begin(store, _request())


def test_refunds_announce_success_and_failure(store: PaymentStore) -> None:
    payment = _succeeded(store)
    store.advance(payment.payment_id, Step.FINISHED, order_id="ord_1")
    done = []
    for index, status in enumerate((pg.REFUND_STATUS_SUCCEEDED, pg.REFUND_STATUS_FAILED)):
        refund = store.begin_refund(
            f"m_1/rf{index}",
            pg.RefundPaymentRequest(request_id=f"rf{index}"),
            payment_id=payment.payment_id,
            amount_minor=100,
            reason="",
        )
        assert not isinstance(refund, pg.RefundPaymentResponse)
        store.finish_refund(refund.refund_id, status, failure_reason="" if index == 0 else "X")
        done.append(refund.refund_id)
    succeeded, failed = done
    assert _announced(store, succeeded) == [
        (f"evt_{succeeded}_payment.refunded", "order-service"),
        (f"evt_{succeeded}_payment.refunded", "notification-service"),
        (f"evt_{succeeded}_payment.refunded", "analytics-service"),
    ]
    assert _announced(store, failed) == [(f"evt_{failed}_refund.failed", "notification-service")]


def test_abandoned_payment_is_gone_and_its_request_id_free(store: PaymentStore) -> None:
    payment = _begin(store, _request())
    store.abandon(payment.payment_id, reason="risk-service DOWNSTREAM_UNAVAILABLE")
    with pytest.raises(NotFound):
        store.payment(payment.payment_id)
    assert store.outbox.rows() == []  # risk failed: no order can exist
    again = _begin(store, _request())
    assert again.payment_id != payment.payment_id


def test_abandoning_after_the_order_call_cancels_the_order_it_may_have_made(
    store: PaymentStore,
) -> None:
    payment = _begin(store, _request())
    store.advance(payment.payment_id, Step.ASSESSED)
    store.abandon(payment.payment_id, reason="order-service DOWNSTREAM_UNAVAILABLE")
    (cleanup,) = store.outbox.rows()
    request = order_pb2.UpdateOrderStatusRequest.FromString(cleanup.request)
    assert (request.order_id, request.status) == (
        f"ord_{payment.payment_id.removeprefix('pay_')}",
        order_pb2.ORDER_STATUS_CANCELLED,
    )
    assert cleanup.missing_ok == 1


def test_abandoning_a_payment_whose_order_call_was_sent_cancels_that_order(
    store: PaymentStore,
) -> None:
    # The assessment is committed with the order's result: the row is still at CREATED.
    payment = _begin(store, _request())
    store.abandon(
        payment.payment_id, reason="order-service DOWNSTREAM_UNAVAILABLE", order_may_exist=True
    )
    (cleanup,) = store.outbox.rows()
    request = order_pb2.UpdateOrderStatusRequest.FromString(cleanup.request)
    assert request.status == order_pb2.ORDER_STATUS_CANCELLED and cleanup.missing_ok == 1


def test_a_payment_that_may_have_been_charged_cannot_be_abandoned(store: PaymentStore) -> None:
    payment = _begin(store, _request())
    store.advance(payment.payment_id, Step.CHARGING)
    with pytest.raises(FailedPrecondition):
        store.abandon(payment.payment_id, reason="x")
    assert store.unfinished_payments() == [payment.payment_id]


def test_effects_pending_of_an_older_database_move_into_the_outbox_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    first = PaymentStore(path)
    payment = _begin(first, _request())
    first.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the schema before the outbox
        for table in ("payments", "refunds"):
            conn.execute(
                f"ALTER TABLE {table} ADD COLUMN effects_pending INTEGER NOT NULL DEFAULT 0"
            )
        conn.execute(
            "UPDATE payments SET status = ?, step = 'finished', effects_pending = 1",
            (pg.PAYMENT_STATUS_SUCCEEDED,),
        )
        conn.commit()
    for _ in range(2):  # a second start finds nothing left to move
        reopened = PaymentStore(path)
        assert [r.target for r in reopened.outbox.rows()] == [
            "notification-service",
            "analytics-service",
        ]
        assert reopened.payment(payment.payment_id).status == pg.PAYMENT_STATUS_SUCCEEDED
        reopened.close()


def test_request_id_past_its_retention_is_refused_while_its_payment_is_kept(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    store = PaymentStore(tmp_path / "gateway.db", clock=clock)
    _succeeded(store)
    clock.advance(8 * 24 * 3600)  # the default retention is 7 days
    with pytest.raises(AlreadyExists):
        _begin(store, _request())
    store.close()


def test_a_new_payment_and_refund_are_leased_by_their_create_commit_and_freed_by_their_finish(
    database_target: Any,
) -> None:
    target = database_target("gateway")
    ours = PaymentStore(target, owner="payment-gateway@host-a:1:aa")
    peer = PaymentStore(target, owner="payment-gateway@host-b:1:bb")
    try:
        payment = _begin(ours, _request())
        key = store_module.payment_lease(payment.payment_id)
        # No moment between the create commit and a claim: a peer finds it held at once.
        holder = peer.leases.holder(key)
        assert holder is not None and holder.owner == ours.leases.owner
        assert not peer.leases.claim(key)
        ours.advance(payment.payment_id, Step.CHARGED, captured_minor=1000, settlement_minor=1000)
        ours.finish(payment.payment_id, pg.PAYMENT_STATUS_SUCCEEDED)
        assert peer.leases.holder(key) is None  # the terminal commit gave it up

        refund = ours.begin_refund(
            "m_1/rf1",
            pg.RefundPaymentRequest(request_id="rf1", payment_id=payment.payment_id),
            payment_id=payment.payment_id,
            amount_minor=400,
            reason="",
        )
        assert not isinstance(refund, pg.RefundPaymentResponse)
        refund_key = store_module.refund_lease(refund.refund_id)
        assert not peer.leases.claim(refund_key)
        done = ours.finish_refund(
            refund.refund_id, pg.REFUND_STATUS_SUCCEEDED, ledger_transaction_id="txn:x"
        )
        assert done.refund.ledger_transaction_id == "txn:x"  # posted and finished in one commit
        assert peer.leases.holder(refund_key) is None
    finally:
        ours.close()
        peer.close()


def test_a_refused_refund_leaves_no_lease(store: PaymentStore) -> None:
    payment = _succeeded(store)
    with pytest.raises(FailedPrecondition):
        store.begin_refund(
            "m_1/rf1",
            pg.RefundPaymentRequest(request_id="rf1", payment_id=payment.payment_id),
            payment_id=payment.payment_id,
            amount_minor=5000,
            reason="",
        )
    assert store._db.all("SELECT lease_key FROM leases") == []
