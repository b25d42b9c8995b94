"""The chaos run's own checks can fail: each is fed what a broken mesh would show.

Fast and without the mesh: a ledger read while a posting lands, a duplicate webhook at the
receiver (the real partner sandbox counts it), money paid out while the bank is down, a member
nobody restarted, a request that left a second payment behind.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any, cast

from paymesh.accounting.v1 import accounting_pb2
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.accounting import accounts
from services.mesh.tls import TransportSecurity
from tests.chaos.invariants import check_requests
from tests.chaos.launched import Comeback
from tests.chaos.load import LoadRecord, Merchant, PaymentRun
from tests.chaos.payouts import (
    PENDING,
    LedgerSample,
    Payouts,
    SettlementRun,
    check_bank_outage,
    check_ledger_samples,
)
from tests.chaos.run import COMEBACK_BOUND_S, check_comeback
from tests.chaos.webhooks import check_webhooks, received
from tests.servers import running_sandbox

MERCHANT = Merchant("mer_1", "key")
AVAILABLE = accounts.available("mer_1")


class FakeLedger:
    """Balances as accounting-service answers them; ``between`` runs before a GetBalance, so a
    posting can land between the merchant's read and the platform's."""

    def __init__(self, balances: dict[str, int]) -> None:
        self.balances = dict(balances)
        self.counts = dict.fromkeys(balances, 1)
        self.between: list[Callable[[], None]] = []

    def post(self, debit: str, credit: str, amount: int) -> None:
        for account, delta in ((debit, -amount), (credit, amount)):
            self.balances[account] = self.balances.get(account, 0) + delta
            self.counts[account] = self.counts.get(account, 0) + 1

    def _balance(self, account: str) -> accounting_pb2.Balance:
        return accounting_pb2.Balance(
            account_id=account,
            balance=common_pb2.Money(
                amount_minor=self.balances.get(account, 0), currency_code="EUR"
            ),
            entry_count=self.counts.get(account, 0),
        )

    async def ListBalances(self, request: Any, **call: Any) -> Any:
        prefix = f"merchants/{request.merchant_id}/"
        return accounting_pb2.ListBalancesResponse(
            balances=[self._balance(a) for a in sorted(self.balances) if a.startswith(prefix)]
        )

    async def GetBalance(self, request: Any, **call: Any) -> Any:
        if self.between:
            self.between.pop(0)()
        return accounting_pb2.GetBalanceResponse(balance=self._balance(request.account_id))


def _payouts() -> Payouts:
    return Payouts({}, [MERCHANT], cast(TransportSecurity, None), now=lambda: 1.0)


def _cut_by_a_posting() -> FakeLedger:
    """A ledger that a capture of 250 reaches between the merchant's read and the platform's."""
    ledger = FakeLedger({AVAILABLE: 1000, accounts.PSP_CLEARING: -1000})
    ledger.between.append(lambda: ledger.post(accounts.PSP_CLEARING, AVAILABLE, 250))
    return ledger


async def test_a_sample_taken_while_a_posting_lands_waits_for_two_agreeing_reads() -> None:
    one_read = await _payouts()._read(cast(Any, _cut_by_a_posting()))
    assert sum(balance for balance, _ in one_read.values()) == -250  # what one read would say

    sample = await _payouts().sample(cast(Any, _cut_by_a_posting()))

    assert sample is not None and sample.net == {"EUR": 0} and sample.reads == 3
    assert sample.kinds["available"] == 1250 and sample.kinds["psp_clearing"] == -1250


async def test_an_unbalanced_ledger_fails_the_sample_check() -> None:
    payouts = _payouts()
    await payouts.sample(cast(Any, FakeLedger({AVAILABLE: 1000, accounts.PSP_CLEARING: -990})))

    check = check_ledger_samples(payouts, duration_s=1.0)

    assert not check.passed and "unbalanced: [(1.0, {'EUR': 10})]" in check.detail


def _outage(paid: list[int], in_transit: int) -> Payouts:
    payouts = _payouts()
    run = SettlementRun("r", "mer_1", 500, "during", 10.0, "stl_1", answered=PENDING)
    payouts.settlements.append(run)
    for i, bank in enumerate(paid):
        kinds = {"bank_payouts": bank, "payout_in_transit": in_transit, "settling": 0}
        payouts.samples.append(
            LedgerSample(
                t=13.0 + i, kinds=kinds, net={"EUR": 0}, reads=2, settlements={"stl_1": PENDING}
            )
        )
    return payouts


def test_money_paid_out_while_the_bank_is_down_fails() -> None:
    held, paid_out, lost = (
        check_bank_outage(p, down_at=10.0, healed_at=20.0)
        for p in (
            _outage([700, 700, 700], 500),
            _outage([700, 1200, 1200], 500),
            _outage([700, 700], 0),
        )
    )

    assert all(c.passed for c in held)
    assert not paid_out[0].passed  # bank_payouts grew
    assert not lost[1].passed  # the pending settlement's money is not in transit


def _note(notification_id: str) -> notification_pb2.Notification:
    return notification_pb2.Notification(
        notification_id=notification_id,
        merchant_id="mer_1",
        delivery_status=notification_pb2.DELIVERY_STATUS_DELIVERED,
    )


def _delivery(key: str, accepted: int) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "accepted": accepted,
        "event_type": "payment.succeeded",
        "payload": {"event_id": "evt_pay_1_payment.succeeded"},
    }


def test_a_webhook_accepted_twice_or_never_fails() -> None:
    payments = [pg.Payment(payment_id="pay_1", status=pg.PAYMENT_STATUS_SUCCEEDED)]
    once, twice, never = (
        check_webhooks([_note("ntf_1")], deliveries, payments, set(), set())
        for deliveries in ([_delivery("ntf_1", 1)], [_delivery("ntf_1", 2)], [])
    )

    assert all(c.passed for c in once)
    assert [c.passed for c in twice][1:3] == [False, False]
    assert [c.passed for c in never][1:3] == [False, False]


def test_the_sandbox_counts_every_accepted_delivery_of_a_key() -> None:
    with running_sandbox() as (address, _):
        for _ in range(2):
            request = urllib.request.Request(
                f"http://{address}/merchant-webhooks/deliver",
                data=json.dumps({"merchant_id": "mer_1"}).encode(),
                headers={"Idempotency-Key": "ntf_1", "Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert reply.status == 200
        [delivery] = received(address)

    assert (delivery["idempotency_key"], delivery["accepted"]) == ("ntf_1", 2)


def test_a_member_the_launcher_did_not_restart_fails_its_comeback() -> None:
    back = Comeback("order-service", 5.0, 100, 0, 101, 1, "SIGKILL", 1.1, 1.6)
    not_restarted = Comeback("order-service", 5.0, 100, 0)
    too_late = Comeback("order-service", 5.0, 100, 0, 101, 1, "SIGKILL", 1.1, COMEBACK_BOUND_S + 1)

    assert [check_comeback(c).passed for c in (back, not_restarted, too_late)] == [
        True,
        False,
        False,
    ]


def test_a_request_that_left_a_second_payment_fails() -> None:
    record = LoadRecord(
        payments=[
            PaymentRun("req_1", "mer_1", 100, payment_id="pay_1", final="PAYMENT_STATUS_SUCCEEDED")
        ]
    )
    one = [pg.Payment(payment_id="pay_1", status=pg.PAYMENT_STATUS_SUCCEEDED)]
    left_behind = [*one, pg.Payment(payment_id="pay_2", status=pg.PAYMENT_STATUS_FAILED)]

    assert check_requests(record, one).passed
    assert not check_requests(record, left_behind).passed
