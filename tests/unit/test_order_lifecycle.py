"""The order lifecycle, and that the gateway's order updates stay inside it.

The gateway sets PAID after a capture, CANCELLED for a payment that did not succeed, and the
status ``order_status_for`` gives after each refund; every such sequence must be allowed.
"""

from __future__ import annotations

import pytest

from paymesh.order.v1 import order_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.mesh.errors import FailedPrecondition
from services.order import lifecycle
from services.payment_gateway.ledger import order_status_for

CREATED = order_pb2.ORDER_STATUS_CREATED


def test_every_status_may_be_set_again() -> None:
    for status in lifecycle.TRANSITIONS:
        assert lifecycle.may_move(status, status)


def test_cancelled_and_refunded_are_final() -> None:
    for final in (order_pb2.ORDER_STATUS_CANCELLED, order_pb2.ORDER_STATUS_REFUNDED):
        assert not any(lifecycle.may_move(final, s) for s in lifecycle.TRANSITIONS if s != final)


def test_refusal_names_both_statuses_and_what_is_allowed() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.require_transition("o1", order_pb2.ORDER_STATUS_PAID, CREATED)
    assert caught.value.reason == "INVALID_STATE"
    assert "PAID" in caught.value.message and "CREATED" in caught.value.message
    assert "PARTIALLY_REFUNDED, REFUNDED" in caught.value.message


@pytest.mark.parametrize(
    "payments",
    [
        [pg.PAYMENT_STATUS_SUCCEEDED],
        [pg.PAYMENT_STATUS_SUCCEEDED, pg.PAYMENT_STATUS_REFUNDED],
        [
            pg.PAYMENT_STATUS_SUCCEEDED,
            pg.PAYMENT_STATUS_PARTIALLY_REFUNDED,
            pg.PAYMENT_STATUS_PARTIALLY_REFUNDED,
            pg.PAYMENT_STATUS_REFUNDED,
        ],
        [pg.PAYMENT_STATUS_DECLINED],
        [pg.PAYMENT_STATUS_FAILED],
        [pg.PAYMENT_STATUS_VOIDED],
    ],
)
def test_the_gateways_order_updates_follow_the_lifecycle(
    payments: list[pg.PaymentStatus.ValueType],
) -> None:
    current = CREATED
    for payment in payments:
        new = order_status_for(payment)
        lifecycle.require_transition("o1", current, new)
        current = new
