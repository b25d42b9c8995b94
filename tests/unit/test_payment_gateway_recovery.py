"""The recovery loop over a real store with a scripted flow: backoff, waiting for breakers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from paymesh.common.v1 import common_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.payment_gateway.dependencies import DependencyWatch
from services.payment_gateway.flow import PaymentFlow, PaymentPending
from services.payment_gateway.recovery import Recovery, RecoveryReport, RecoverySchedule
from services.payment_gateway.store import NewPayment, PaymentRecord, PaymentStore, Step
from tests.unit.fakes import FakeClock


class ScriptedFlow:
    """Stands in for PaymentFlow: each run raises the next scripted exception, or finishes."""

    def __init__(self, store: PaymentStore) -> None:
        self.store = store
        self.script: list[Exception] = []
        self.runs: list[str] = []
        self._driving: set[str] = set()

    def is_driving(self, flow_id: str) -> bool:
        return flow_id in self._driving

    @contextlib.contextmanager
    def driving(self, flow_id: str) -> Iterator[None]:
        self._driving.add(flow_id)
        try:
            yield
        finally:
            self._driving.discard(flow_id)

    async def run_payment(self, payment_id: str, *, recovering: bool) -> None:
        assert recovering
        self.runs.append(payment_id)
        if self.script:
            raise self.script.pop(0)
        self.store.finish(payment_id, pg.PAYMENT_STATUS_FAILED, failure_reason="X")

    async def run_refund(self, refund_id: str) -> None:
        raise AssertionError("no refunds here")


class OpenBreakers:
    """Stands in for DependencyWatch: the open time left of each target."""

    def __init__(self) -> None:
        self.left: dict[str, float] = {}

    def open_left_s(self, target: str) -> float:
        return self.left.get(target, 0.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PaymentStore]:
    made = PaymentStore(tmp_path / "gateway.db")
    yield made
    made.close()


def _pending_payment(store: PaymentStore, request_id: str = "r1") -> PaymentRecord:
    request = pg.CreatePaymentRequest(
        request_id=request_id,
        merchant_id="m_1",
        amount=common_pb2.Money(amount_minor=100, currency_code="EUR"),
        payment_method_token="tok_visa",
    )
    started = store.begin_payment(
        f"m_1/{request_id}",
        request,
        NewPayment(
            merchant_id="m_1",
            amount=request.amount,
            settlement_currency_code="",
            payment_method_token="tok_visa",
            customer_ip="",
            customer_country_code="",
            description="",
            merchant_order_reference="",
            webhook_url="",
        ),
    )
    assert isinstance(started, PaymentRecord)
    return started


def _recovery(
    store: PaymentStore, flow: ScriptedFlow, clock: FakeClock, watch: Any = None, **schedule: Any
) -> Recovery:
    return Recovery(
        store,
        cast(PaymentFlow, flow),
        schedule=RecoverySchedule(**schedule),
        watch=cast(DependencyWatch, watch),
        clock=clock,
        rng=lambda: 1.0,  # the jitter's upper bound: the backoff is exact
    )


def _pending(payment_id: str) -> PaymentPending:
    return PaymentPending(payment_id, Step.CREATED, "risk-service: UNAVAILABLE")


async def test_an_item_that_stays_pending_is_retried_with_doubling_backoff(
    store: PaymentStore,
) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    payment = _pending_payment(store)
    flow.script = [_pending(payment.payment_id)] * 3
    recovery = _recovery(store, flow, clock, initial_backoff_s=1.0, max_backoff_s=3.0)

    tried_at = []
    for _ in range(16):
        report = await recovery.run_once()
        if report.pending or report.finished:
            tried_at.append(clock())
        clock.advance(0.5)
    # Tried at once, then after 1 s, 2 s and (capped) 3 s: each retry waits out its backoff.
    assert [t - tried_at[0] for t in tried_at] == [0.0, 1.0, 3.0, 6.0]
    assert store.unfinished_payments() == []


async def test_next_pass_comes_when_the_first_backoff_ends(store: PaymentStore) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    payment = _pending_payment(store)
    flow.script = [_pending(payment.payment_id)]
    recovery = _recovery(store, flow, clock, interval_s=30.0, initial_backoff_s=2.0)
    assert recovery.next_pass_in_s() == 30.0
    await recovery.run_once()
    assert recovery.next_pass_in_s() == pytest.approx(2.0)


async def test_an_item_whose_downstream_breaker_is_open_waits_without_a_call(
    store: PaymentStore,
) -> None:
    clock, flow, breakers = FakeClock(), ScriptedFlow(store), OpenBreakers()
    payment = _pending_payment(store)  # its next step calls risk-service
    breakers.left["risk-service"] = 10.0
    recovery = _recovery(store, flow, clock, breakers, interval_s=30.0)

    assert await recovery.run_once() == RecoveryReport(waiting=1)
    assert flow.runs == []
    assert recovery.next_pass_in_s() == pytest.approx(10.0)
    clock.advance(10.0)
    breakers.left.clear()
    assert await recovery.run_once() == RecoveryReport(finished=1)
    assert flow.runs == [payment.payment_id]


async def test_an_item_driven_by_a_live_request_is_left_to_it(store: PaymentStore) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    payment = _pending_payment(store)
    with flow.driving(payment.payment_id):
        assert await _recovery(store, flow, clock).run_once() == RecoveryReport()
    assert flow.runs == []


async def test_waiting_on_a_downstream_is_no_warning(
    store: PaymentStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    payment = _pending_payment(store)
    flow.script = [_pending(payment.payment_id)] * 5
    recovery = _recovery(store, flow, clock)
    with caplog.at_level(logging.DEBUG, logger="paymesh.payment_gateway.recovery"):
        for _ in range(5):
            await recovery.run_once()
            clock.advance(recovery.next_pass_in_s())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # One line per change, not one per pass.
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1


async def test_one_broken_item_does_not_stop_the_others(store: PaymentStore) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    first, second = _pending_payment(store, "r1"), _pending_payment(store, "r2")
    flow.script = [RuntimeError("bug")]
    report = await _recovery(store, flow, clock).run_once()
    assert (report.pending, report.finished) == (1, 1)
    assert flow.runs == [first.payment_id, second.payment_id]


async def test_run_forever_sleeps_until_the_next_pass_is_due(store: PaymentStore) -> None:
    clock, flow = FakeClock(), ScriptedFlow(store)
    payment = _pending_payment(store)
    flow.script = [_pending(payment.payment_id)]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    recovery = Recovery(
        store,
        cast(PaymentFlow, flow),
        schedule=RecoverySchedule(interval_s=30.0, initial_backoff_s=1.0),
        clock=clock,
        rng=lambda: 1.0,
        sleep=sleep,
    )
    with pytest.raises(asyncio.CancelledError):
        await recovery.run_forever()
    assert slept == [1.0, 30.0, 30.0]
    assert flow.runs == [payment.payment_id, payment.payment_id]


def test_schedule_defaults_and_bad_values() -> None:
    schedule = RecoverySchedule()
    assert (schedule.interval_s, schedule.initial_backoff_s, schedule.max_backoff_s) == (
        30.0,
        1.0,
        300.0,
    )
    for bad in ({"interval_s": 0}, {"max_backoff_s": 0.5}, {"initial_backoff_s": float("nan")}):
        with pytest.raises(ValueError):
            RecoverySchedule(**bad)
