"""The money invariants, checked after the faults against every service's own store.

Each check reads state only through the owning service's RPCs (the gateway's payments, the
order service's orders, the channel adapter's charges, the ledger's transactions and balances)
and the partner sandbox's record of charges, and returns one pass/fail line.
"""

from __future__ import annotations

import collections
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.channel_adapter.v1 import channel_adapter_pb2 as ca
from paymesh.channel_adapter.v1 import channel_adapter_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from services.accounting import accounts
from services.mesh.tls import TransportSecurity
from tests.chaos.load import LoadRecord, Merchant

PSP_CLEARING = accounts.PSP_CLEARING
BANK_PAYOUTS = accounts.BANK_PAYOUTS
UNCHARGED = {pg.PAYMENT_STATUS_DECLINED, pg.PAYMENT_STATUS_FAILED, pg.PAYMENT_STATUS_VOIDED}
CAPTURED_CHARGES = {
    ca.CHARGE_STATUS_SUCCEEDED,
    ca.CHARGE_STATUS_PARTIALLY_REFUNDED,
    ca.CHARGE_STATUS_REFUNDED,
}
TERMINAL = {
    pg.PAYMENT_STATUS_SUCCEEDED,
    pg.PAYMENT_STATUS_DECLINED,
    pg.PAYMENT_STATUS_FAILED,
    pg.PAYMENT_STATUS_REFUNDED,
    pg.PAYMENT_STATUS_PARTIALLY_REFUNDED,
    pg.PAYMENT_STATUS_VOIDED,
}


@dataclass(frozen=True, slots=True)
class Check:
    """One invariant's verdict."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


async def pages(call: Any, request: Any, field: str, *, rpc_timeout_s: float = 10) -> list[Any]:
    """Every item of a paged List RPC, each page asked with ``rpc_timeout_s``."""
    items: list[Any] = []
    while True:
        reply = await call(request, timeout=rpc_timeout_s)
        items += list(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token


def sandbox_charges(sandbox_address: str) -> list[dict[str, Any]]:
    """Every charge the payment channel (the sandbox) holds."""
    with urllib.request.urlopen(
        f"http://{sandbox_address}/payment-channel/charges", timeout=10
    ) as reply:
        return list(json.load(reply)["charges"])


async def gateway_payments(
    gateway_address: str, merchants: list[Merchant], operator: TransportSecurity
) -> list[Any]:
    """Every payment of the run's merchants, from the gateway's store (read as the operator)."""
    async with operator.aio_channel("payment-gateway", gateway_address) as channel:
        stub = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)
        payments: list[Any] = []
        for merchant in merchants:
            payments += await pages(
                stub.ListPayments,
                pg.ListPaymentsRequest(merchant_id=merchant.merchant_id, page_size=500),
                "payments",
            )
    return payments


async def check_money(
    *,
    addresses: dict[str, str],
    sandbox_address: str,
    merchants: list[Merchant],
    record: LoadRecord,
    operator: TransportSecurity,
) -> list[Check]:
    """Exactly once in orders, charges and ledger; charged at most once; ledger balanced."""
    payments = await gateway_payments(addresses["payment-gateway"], merchants, operator)
    by_id = {p.payment_id: p for p in payments}
    acknowledged = {r.payment_id for r in record.payments if r.final == "PAYMENT_STATUS_SUCCEEDED"}
    succeeded = {p.payment_id for p in payments if p.status == pg.PAYMENT_STATUS_SUCCEEDED}
    #: Payments that must have had nothing captured and nothing posted, whatever happened.
    uncharged = {p.payment_id for p in payments if p.status in UNCHARGED}
    checks: list[Check] = []

    checks.append(check_requests(record, payments))
    unknown = acknowledged - set(by_id)
    flipped = {pid for pid in acknowledged & set(by_id) if pid not in succeeded}
    checks.append(
        Check(
            "acknowledged SUCCEEDED payments are SUCCEEDED in the gateway",
            not unknown and not flipped,
            f"{len(acknowledged)} acknowledged; missing {sorted(unknown)[:5]}, "
            f"no longer succeeded {sorted(flipped)[:5]}",
        )
    )
    pending = [p.payment_id for p in payments if p.status not in TERMINAL]
    checks.append(
        Check(
            "every payment reached a terminal status (recovery finished the pending ones)",
            not pending,
            f"{len(payments)} payments, {len(pending)} not terminal {pending[:5]}",
        )
    )

    async with (
        operator.aio_channel("order-service", addresses["order-service"]) as o_channel,
        operator.aio_channel("channel-adapter", addresses["channel-adapter"]) as c_channel,
        operator.aio_channel("accounting-service", addresses["accounting-service"]) as a_channel,
    ):
        orders_stub = order_pb2_grpc.OrderServiceStub(o_channel)
        channel_stub = channel_adapter_pb2_grpc.ChannelAdapterServiceStub(c_channel)
        ledger = accounting_pb2_grpc.AccountingServiceStub(a_channel)

        orders: list[Any] = []
        for merchant in merchants:
            orders += await pages(
                orders_stub.ListOrders,
                order_pb2.ListOrdersRequest(merchant_id=merchant.merchant_id, page_size=500),
                "orders",
            )
        orders_of = collections.Counter(o.payment_id for o in orders)
        paid = {o.payment_id for o in orders if o.status == order_pb2.ORDER_STATUS_PAID}
        bad_orders = sorted(
            pid for pid in succeeded | acknowledged if orders_of[pid] != 1 or pid not in paid
        )
        checks.append(
            Check(
                "every SUCCEEDED payment has exactly one order, PAID (order-service)",
                not bad_orders,
                f"{len(succeeded | acknowledged)} checked against {len(orders)} orders; "
                f"wrong: {bad_orders[:5]}",
            )
        )

        bad_charges = []
        for pid in sorted(succeeded | acknowledged):
            charges = await pages(
                channel_stub.ListCharges, ca.ListChargesRequest(payment_id=pid), "charges"
            )
            succeeded_charges = [c for c in charges if c.status == ca.CHARGE_STATUS_SUCCEEDED]
            if len(charges) != 1 or len(succeeded_charges) != 1:
                bad_charges.append(pid)
        checks.append(
            Check(
                "every SUCCEEDED payment has exactly one succeeded charge (channel-adapter)",
                not bad_charges,
                f"wrong: {bad_charges[:5]}",
            )
        )

        wrongly_charged = []
        for pid in sorted(uncharged):
            charges = await pages(
                channel_stub.ListCharges, ca.ListChargesRequest(payment_id=pid), "charges"
            )
            if any(c.status in CAPTURED_CHARGES for c in charges):
                wrongly_charged.append(pid)
        channel = sandbox_charges(sandbox_address)
        captured_at_channel = collections.Counter(
            c["reference"] for c in channel if c["status"] in ("captured", "partially_refunded")
        )
        wrongly_charged += sorted(pid for pid in uncharged if captured_at_channel[pid])
        checks.append(
            Check(
                "no FAILED, DECLINED or VOIDED payment kept a captured charge "
                "(channel-adapter and the channel itself)",
                not wrongly_charged,
                f"{len(uncharged)} checked; charged: {sorted(set(wrongly_charged))[:5]}",
            )
        )
        per_reference = collections.Counter(c["reference"] for c in channel)
        twice = sorted(ref for ref, n in per_reference.items() if n > 1)
        missing_at_channel = sorted(pid for pid in succeeded if per_reference[pid] != 1)
        checks.append(
            Check(
                "no payment was charged twice (the channel's own charges)",
                not twice and not missing_at_channel,
                f"{len(channel)} charges at the channel; charged twice: {twice[:5]}; "
                f"SUCCEEDED without exactly one: {missing_at_channel[:5]}",
            )
        )

        bad_ledger = []
        for pid in sorted(succeeded | acknowledged):
            payment = by_id.get(pid)
            try:
                txn = (
                    await ledger.GetTransaction(
                        accounting_pb2.GetTransactionRequest(transaction_id=f"txn:{pid}:capture"),
                        timeout=10,
                    )
                ).transaction
            except aio.AioRpcError:
                bad_ledger.append(pid)
                continue
            debit = sum(
                e.amount.amount_minor
                for e in txn.entries
                if e.direction == accounting_pb2.ENTRY_DIRECTION_DEBIT
            )
            credit = sum(
                e.amount.amount_minor
                for e in txn.entries
                if e.direction == accounting_pb2.ENTRY_DIRECTION_CREDIT
            )
            captured = payment.captured_amount.amount_minor if payment is not None else -1
            if debit != credit or credit != captured:
                bad_ledger.append(pid)
        wrongly_posted = []
        for pid in sorted(uncharged):
            try:
                await ledger.GetTransaction(
                    accounting_pb2.GetTransactionRequest(transaction_id=f"txn:{pid}:capture"),
                    timeout=10,
                )
                wrongly_posted.append(pid)
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    wrongly_posted.append(pid)
        checks.append(
            Check(
                "no FAILED, DECLINED or VOIDED payment has a capture in the ledger",
                not wrongly_posted,
                f"{len(uncharged)} checked; posted: {wrongly_posted[:5]}",
            )
        )
        clearing = await pages(
            ledger.ListEntries,
            accounting_pb2.ListEntriesRequest(account_id=PSP_CLEARING, page_size=500),
            "entries",
        )
        captures = collections.Counter(
            e.transaction_id for e in clearing if e.transaction_id.endswith(":capture")
        )
        posted_twice = sorted(t for t, n in captures.items() if n > 1)
        expected = {f"txn:{pid}:capture" for pid in succeeded}
        stray = sorted(set(captures) - expected)
        checks.append(
            Check(
                "every SUCCEEDED payment is in the ledger exactly once (accounting-service)",
                not bad_ledger and not posted_twice and not stray,
                f"{len(captures)} capture transactions; bad: {bad_ledger[:5]}; "
                f"posted twice: {posted_twice[:5]}; without a SUCCEEDED payment: {stray[:5]}",
            )
        )

        totals: collections.Counter[str] = collections.Counter()
        for merchant in merchants:
            for balance in await pages(
                ledger.ListBalances,
                accounting_pb2.ListBalancesRequest(merchant_id=merchant.merchant_id, page_size=500),
                "balances",
            ):
                totals[balance.balance.currency_code] += balance.balance.amount_minor
        for currency in sorted(set(totals) | {"EUR"}):
            platform = {}
            for account_id in (PSP_CLEARING, BANK_PAYOUTS):
                platform[account_id] = (
                    await ledger.GetBalance(
                        accounting_pb2.GetBalanceRequest(
                            account_id=account_id, currency_code=currency
                        ),
                        timeout=10,
                    )
                ).balance.balance.amount_minor
            net = totals[currency] + sum(platform.values())
            checks.append(
                Check(
                    f"the ledger balances in {currency} at the end",
                    net == 0,
                    f"merchants {totals[currency]} + "
                    + " + ".join(f"{a} {v}" for a, v in platform.items())
                    + f" = {net}",
                )
            )
    return checks


def check_requests(record: LoadRecord, payments: list[Any]) -> Check:
    """Each merchant request made at most one payment, which kept the status it was answered.

    A transient UNAVAILABLE leaves nothing behind, so its retry makes the request's only
    payment: more payments than the requests that never got an answer would mean one was left.
    """
    by_id = {p.payment_id: p for p in payments}
    answered = [r for r in record.payments if r.payment_id]
    answered_ids = [r.payment_id for r in answered]
    shared = len(answered_ids) - len(set(answered_ids))
    unanswered = len(record.payments) - len(answered)
    extra = len(set(by_id) - set(answered_ids))
    changed = [
        r.payment_id
        for r in answered
        if r.payment_id in by_id and pg.PaymentStatus.Name(by_id[r.payment_id].status) != r.final
    ]
    missing = [pid for pid in answered_ids if pid not in by_id]
    transient = sum(r.transient for r in record.payments)
    kept = sum(r.transient_kept for r in record.payments)
    return Check(
        "each merchant request made at most one payment, kept as it was answered",
        not shared and extra <= unanswered and not changed and not missing,
        f"{len(record.payments)} requests ({transient} UNAVAILABLE answers with RetryInfo "
        f"retried: {transient - kept} left the key free, {kept} kept the payment PENDING), "
        f"{len(answered)} answered, {len(payments)} payments; {extra} payments of the "
        f"{unanswered} unanswered requests; answered with another status: {changed[:3]}; "
        f"answered but missing: {missing[:3]}; one payment for two requests: {shared}",
    )


def check_deadlines(record: LoadRecord) -> Check:
    """The mesh answered every call before the deadline it was given.

    gRPC ends a call at the client's deadline whatever happens, so comparing durations with
    it proves nothing; what counts is whether the mesh itself answered (a reply, or a status
    with its details, which propagation lets it send before the deadline) or left the
    client's timer to end the call.
    """
    late = [a for a in record.attempts if not a.answered]
    worst = max((a.latency_s - a.timeout_s for a in record.attempts), default=0.0)
    return Check(
        "the mesh answered every call before the deadline it got",
        not late,
        f"{len(record.attempts)} calls, {len(late)} left to the client's deadline "
        f"(at {[round(a.started, 1) for a in late[:5]]} s); latest answer {worst:+.3f} s "
        "vs its deadline",
    )


def check_success_outside_faults(
    record: LoadRecord, windows: list[tuple[float, float]], minimum: float
) -> Check:
    """Outside every fault's window, at least ``minimum`` of the payments SUCCEEDED."""
    outside = [
        r
        for r in record.payments
        if r.started_at is not None and not any(a <= r.started_at <= b for a, b in windows)
    ]
    succeeded = sum(1 for r in outside if r.final == "PAYMENT_STATUS_SUCCEEDED")
    share = succeeded / len(outside) if outside else 0.0
    return Check(
        f"at least {minimum:.0%} of the payments started outside the windows of the faults "
        "on their path SUCCEEDED",
        bool(outside) and share >= minimum,
        f"{succeeded} of {len(outside)} ({share:.1%})",
    )
