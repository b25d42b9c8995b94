"""payment-gateway's store and request checks: claims, replays, refund reservations, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptors.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from paymesh.common.v1 import common_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.payment_gateway.servicer import (
    for_merchant,
    scoped_key,
    validate_create,
    validate_refund,
)
from services.payment_gateway.store import NewPayment, PaymentRecord, PaymentStore, Step


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
