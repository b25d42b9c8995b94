"""The payment and refund flows: one persisted step at a time, each downstream call idempotent.

Every mutating downstream call carries a request id derived from the payment or refund id, so
running a flow again from any committed step (after a crash, or in the recovery pass) repeats
nothing: the channel dedupes the charge by its key, the ledger by the transaction id, and so on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.channel_adapter.v1 import channel_adapter_pb2 as ca
from paymesh.channel_adapter.v1 import channel_adapter_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.risk.v1 import risk_pb2, risk_pb2_grpc
from services import downstream
from services.clients import ClientFactory
from services.downstream import is_ambiguous as is_transient
from services.payment_gateway import ledger
from services.payment_gateway.store import (
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    RefundStep,
    Step,
    payment_message,
    refund_message,
)

if TYPE_CHECKING:  # the Async stub classes exist only in the .pyi files
    from paymesh.accounting.v1.accounting_pb2_grpc import AccountingServiceAsyncStub
    from paymesh.analytics.v1.analytics_pb2_grpc import AnalyticsServiceAsyncStub
    from paymesh.channel_adapter.v1.channel_adapter_pb2_grpc import (
        ChannelAdapterServiceAsyncStub,
    )
    from paymesh.notification.v1.notification_pb2_grpc import NotificationServiceAsyncStub
    from paymesh.order.v1.order_pb2_grpc import OrderServiceAsyncStub
    from paymesh.risk.v1.risk_pb2_grpc import RiskServiceAsyncStub

log = logging.getLogger("paymesh.payment_gateway.flow")

EVENT_TYPES = {
    pg.PAYMENT_STATUS_SUCCEEDED: ("payment.succeeded", analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED),
    pg.PAYMENT_STATUS_DECLINED: ("payment.declined", analytics_pb2.EVENT_TYPE_PAYMENT_DECLINED),
    pg.PAYMENT_STATUS_FAILED: ("payment.failed", analytics_pb2.EVENT_TYPE_PAYMENT_FAILED),
    pg.PAYMENT_STATUS_VOIDED: ("payment.voided", analytics_pb2.EVENT_TYPE_PAYMENT_VOIDED),
}


def reason_of(error: aio.AioRpcError, default: str = "DOWNSTREAM_UNAVAILABLE") -> str:
    """The ErrorInfo reason a callee sent, or ``default`` when it sent none."""
    return downstream.reason_of(error, default)


class PaymentPending(Exception):
    """The flow stopped at a step whose outcome is not known yet; recovery will finish it."""

    def __init__(self, payment_id: str, step: str, cause: str) -> None:
        super().__init__(f"{payment_id} is pending at step {step!r}: {cause}")
        self.payment_id = payment_id
        self.step = step
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Downstreams:
    """The stubs of every service the payment flows call, made through the client factory.

    (merchant-auth-service is called by the bootstrap's gate, before a servicer runs.)
    """

    risk: RiskServiceAsyncStub
    orders: OrderServiceAsyncStub
    channel: ChannelAdapterServiceAsyncStub
    accounting: AccountingServiceAsyncStub
    notifications: NotificationServiceAsyncStub
    analytics: AnalyticsServiceAsyncStub

    @classmethod
    def from_clients(cls, clients: ClientFactory) -> Downstreams:
        """Stubs along the gateway's topology edges (the policy chain applies to each)."""
        return cls(
            risk=clients.stub("risk-service", risk_pb2_grpc.RiskServiceStub),
            orders=clients.stub("order-service", order_pb2_grpc.OrderServiceStub),
            channel=clients.stub(
                "channel-adapter", channel_adapter_pb2_grpc.ChannelAdapterServiceStub
            ),
            accounting=clients.stub(
                "accounting-service", accounting_pb2_grpc.AccountingServiceStub
            ),
            notifications=clients.stub(
                "notification-service", notification_pb2_grpc.NotificationServiceStub
            ),
            analytics=clients.stub("analytics-service", analytics_pb2_grpc.AnalyticsServiceStub),
        )


def order_id_of(payment_id: str) -> str:
    """The order id recorded for a payment: deterministic, so a re-run finds the same order."""
    return f"ord_{payment_id.removeprefix('pay_')}"


class PaymentFlow:
    """Runs payments and refunds step by step; at most one driver per payment at a time."""

    def __init__(
        self,
        store: PaymentStore,
        downstreams: Downstreams,
        *,
        charge_cutoff_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args:
        store: the gateway's own store.
        downstreams: the stubs to call.
        charge_cutoff_s: recovery never sends a first charge for a payment older than this;
            with no charge at the channel by then it ends FAILED instead.
        clock: time source.
        """
        self._store = store
        self._down = downstreams
        self._charge_cutoff_s = charge_cutoff_s
        self._clock = clock
        self._driving: set[str] = set()

    @property
    def downstreams(self) -> Downstreams:
        """The stubs the flow calls."""
        return self._down

    def is_driving(self, flow_id: str) -> bool:
        """Whether some task is running the flow of this payment or refund right now."""
        return flow_id in self._driving

    @contextmanager
    def driving(self, flow_id: str) -> Iterator[None]:
        """Mark a payment or refund as driven by the current task (recovery skips it)."""
        self._driving.add(flow_id)
        try:
            yield
        finally:
            self._driving.discard(flow_id)

    # --- payments ---------------------------------------------------------------------------

    async def run_payment(
        self, payment_id: str, *, recovering: bool = False, stop_after: str | None = None
    ) -> pg.Payment | None:
        """Drive a payment from its committed step to a terminal status, then send its effects.

        ``stop_after`` stops once that step is committed (returns ``None``): it leaves the
        store exactly as a process killed right after that step would.

        Raises:
            PaymentPending: a step's outcome is unknown; the payment stays PENDING.
        """
        payment = self._store.payment(payment_id)
        while payment.step != Step.FINISHED:
            if payment.step == stop_after:
                return None
            payment = await self._step(payment, recovering=recovering)
        message = payment_message(payment)
        if payment.effects_pending:
            await self.send_payment_effects(payment)
        return message

    async def _step(self, p: PaymentRecord, *, recovering: bool) -> PaymentRecord:
        match p.step:
            case Step.CREATED:
                return await self._assess(p)
            case Step.ASSESSED:
                return await self._order(p)
            case Step.ORDERED:
                # Committed before the channel is called: from here a charge may exist, so a
                # fault no longer means "nothing charged".
                return self._store.advance(p.payment_id, Step.CHARGING)
            case Step.CHARGING:
                return await self._charge(p, recovering=recovering)
            case Step.CHARGED:
                return await self._post(p)
            case Step.POSTED:
                return await self._mark_paid(p)
            case Step.VOIDING:
                return await self._void(p, p.failure_reason or "INTERNAL_ERROR")
        raise ValueError(f"payment {p.payment_id} has unknown step {p.step!r}")

    def _finish(
        self, p: PaymentRecord, status: pg.PaymentStatus.ValueType, **fields: object
    ) -> PaymentRecord:
        self._store.finish(p.payment_id, status, **fields)
        return self._store.payment(p.payment_id)

    async def _assess(self, p: PaymentRecord) -> PaymentRecord:
        try:
            reply = await self._down.risk.AssessPayment(
                risk_pb2.AssessPaymentRequest(
                    request_id=f"{p.payment_id}:risk",
                    merchant_id=p.merchant_id,
                    payment_id=p.payment_id,
                    amount=p.amount,
                    customer_ip=p.customer_ip,
                    customer_country_code=p.customer_country_code,
                )
            )
        except aio.AioRpcError as error:
            # Nothing is charged before the charging step, so any fault ends the payment.
            log.warning("risk failed for %s: %s", p.payment_id, error.details())
            return self._finish(p, pg.PAYMENT_STATUS_FAILED, failure_reason=reason_of(error))
        assessment = reply.assessment
        facts = {
            "risk_assessment_id": assessment.assessment_id,
            "risk_decision": assessment.decision,
            "risk_score": assessment.score,
        }
        if assessment.decision == risk_pb2.RISK_DECISION_DECLINE:
            return self._finish(
                p, pg.PAYMENT_STATUS_DECLINED, decline_reason="RISK_DECLINED", **facts
            )
        return self._store.advance(p.payment_id, Step.ASSESSED, **facts)

    async def _order(self, p: PaymentRecord) -> PaymentRecord:
        order_id = order_id_of(p.payment_id)
        try:
            await self._down.orders.CreateOrder(
                order_pb2.CreateOrderRequest(
                    request_id=f"{p.payment_id}:order",
                    order_id=order_id,
                    merchant_id=p.merchant_id,
                    payment_id=p.payment_id,
                    amount=p.amount,
                    merchant_order_reference=p.merchant_order_reference,
                    description=p.description,
                )
            )
        except aio.AioRpcError as error:
            log.warning("order failed for %s: %s", p.payment_id, error.details())
            return self._finish(p, pg.PAYMENT_STATUS_FAILED, failure_reason=reason_of(error))
        return self._store.advance(p.payment_id, Step.ORDERED, order_id=order_id)

    def _charge_request(self, p: PaymentRecord) -> ca.ChargeRequest:
        # Built only from the stored row, so a re-sent charge has the very same body and the
        # adapter replays the first one instead of refusing a reused key.
        return ca.ChargeRequest(
            request_id=f"{p.payment_id}:charge",
            payment_id=p.payment_id,
            merchant_id=p.merchant_id,
            amount=p.amount,
            settlement_currency_code=p.settlement_currency_code,
            payment_method_token=p.payment_method_token,
        )

    async def _existing_charge(self, p: PaymentRecord) -> ca.Charge | None:
        """The charge the channel holds for this payment's charge key, if any."""
        reply = await self._down.channel.ListCharges(ca.ListChargesRequest(payment_id=p.payment_id))
        key = f"{p.payment_id}:charge"
        ours = [charge for charge in reply.charges if charge.request_id == key]
        # Only the gateway charges for its payments, so any charge of this payment is ours.
        found = ours or list(reply.charges)
        return found[0] if found else None

    async def _charge(self, p: PaymentRecord, *, recovering: bool) -> PaymentRecord:
        try:
            if recovering and self._clock() - p.create_time > self._charge_cutoff_s:
                # Too late to charge a customer who never got an answer: use only a charge
                # that already exists, otherwise end the payment without charging.
                charge = await self._existing_charge(p)
                if charge is None:
                    return self._finish(
                        p, pg.PAYMENT_STATUS_FAILED, failure_reason="DOWNSTREAM_UNAVAILABLE"
                    )
            else:
                charge = (await self._down.channel.Charge(self._charge_request(p))).charge
        except aio.AioRpcError as error:
            if is_transient(error):
                raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
            return await self._charge_refused(p, reason_of(error, "INTERNAL_ERROR"))
        return await self._charge_outcome(p, charge)

    async def _charge_refused(self, p: PaymentRecord, reason: str) -> PaymentRecord:
        """The adapter refused the charge outright; make sure no charge exists before FAILED."""
        try:
            charge = await self._existing_charge(p)
        except aio.AioRpcError as error:
            raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
        if charge is not None:
            return await self._charge_outcome(p, charge)
        return self._finish(p, pg.PAYMENT_STATUS_FAILED, failure_reason=reason)

    async def _charge_outcome(self, p: PaymentRecord, charge: ca.Charge) -> PaymentRecord:
        if charge.status in (
            ca.CHARGE_STATUS_SUCCEEDED,
            ca.CHARGE_STATUS_PARTIALLY_REFUNDED,
            ca.CHARGE_STATUS_REFUNDED,
        ):
            settled = charge.settlement_amount
            if not settled.currency_code:
                settled = charge.amount
            return self._store.advance(
                p.payment_id,
                Step.CHARGED,
                charge_id=charge.charge_id,
                captured_minor=charge.amount.amount_minor,
                settlement_minor=settled.amount_minor,
                settlement_currency_code=settled.currency_code,
                exchange_rate=charge.exchange_rate,
            )
        if charge.status == ca.CHARGE_STATUS_DECLINED:
            return self._finish(
                p,
                pg.PAYMENT_STATUS_DECLINED,
                charge_id=charge.charge_id,
                decline_reason="CHANNEL_DECLINED",
            )
        if charge.status == ca.CHARGE_STATUS_FAILED:
            return self._finish(
                p,
                pg.PAYMENT_STATUS_FAILED,
                charge_id=charge.charge_id,
                failure_reason=charge.failure_reason or "DOWNSTREAM_UNAVAILABLE",
            )
        if charge.status == ca.CHARGE_STATUS_VOIDED:
            return self._finish(
                p,
                pg.PAYMENT_STATUS_VOIDED,
                charge_id=charge.charge_id,
                failure_reason="INTERNAL_ERROR",
            )
        raise PaymentPending(
            p.payment_id, p.step, f"charge is {ca.ChargeStatus.Name(charge.status)}"
        )

    async def _post(self, p: PaymentRecord) -> PaymentRecord:
        transaction_id = ledger.capture_transaction_id(p.payment_id)
        settled = common_pb2.Money(
            amount_minor=p.settlement_minor, currency_code=p.settlement_currency_code
        )
        try:
            await self._down.accounting.PostTransaction(
                accounting_pb2.PostTransactionRequest(
                    request_id=f"{p.payment_id}:ledger",
                    transaction_id=transaction_id,
                    kind=accounting_pb2.TRANSACTION_KIND_PAYMENT,
                    reference_id=p.payment_id,
                    description=f"capture of payment {p.payment_id}",
                    postings=ledger.capture_postings(p.merchant_id, settled),
                )
            )
        except aio.AioRpcError as error:
            if is_transient(error):
                raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
            # The ledger refuses this capture for good: give the customer's money back.
            log.error("ledger refused %s: %s; voiding", transaction_id, error.details())
            voiding = self._store.advance(
                p.payment_id, Step.VOIDING, failure_reason=reason_of(error, "INTERNAL_ERROR")
            )
            return await self._void(voiding, voiding.failure_reason)
        return self._store.advance(p.payment_id, Step.POSTED, ledger_transaction_id=transaction_id)

    async def _void(self, p: PaymentRecord, reason: str) -> PaymentRecord:
        try:
            await self._down.channel.VoidCharge(
                ca.VoidChargeRequest(
                    request_id=f"{p.payment_id}:void", charge_id=p.charge_id, reason=reason
                )
            )
        except aio.AioRpcError as error:
            raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
        return self._finish(p, pg.PAYMENT_STATUS_VOIDED, failure_reason=reason)

    async def _mark_paid(self, p: PaymentRecord) -> PaymentRecord:
        try:
            await self._down.orders.UpdateOrderStatus(
                order_pb2.UpdateOrderStatusRequest(
                    request_id=f"{p.payment_id}:order-paid",
                    order_id=p.order_id,
                    status=order_pb2.ORDER_STATUS_PAID,
                    reason="payment succeeded",
                )
            )
        except aio.AioRpcError as error:
            if is_transient(error):
                raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
            # The money moved and is in the ledger; a refused order update must not undo that.
            log.error("order %s not marked PAID: %s", p.order_id, error.details())
        return self._finish(p, pg.PAYMENT_STATUS_SUCCEEDED)

    async def send_payment_effects(self, p: PaymentRecord) -> bool:
        """Order cancellation, webhook and analytics event of a finished payment (best effort).

        Returns whether all were sent; if not, the payment stays marked and recovery resends
        them with the same request ids (each callee dedupes them).
        """
        status = pg.PaymentStatus.ValueType(p.status)
        if p.captured_minor and status not in (pg.PAYMENT_STATUS_VOIDED,):
            # Refunded before these effects got through: they still announce the success, with
            # the very body of the first attempt so the callees dedupe the resend.
            status = pg.PAYMENT_STATUS_SUCCEEDED
        event, event_type = EVENT_TYPES[status]
        amount = p.amount
        if status == pg.PAYMENT_STATUS_SUCCEEDED:
            amount = common_pb2.Money(amount_minor=p.captured_minor, currency_code=p.currency_code)
        payload = {
            "event": event,
            "payment_id": p.payment_id,
            "merchant_id": p.merchant_id,
            "status": pg.PaymentStatus.Name(status).removeprefix("PAYMENT_STATUS_"),
            "amount_minor": p.amount_minor,
            "currency_code": p.currency_code,
            "captured_minor": p.captured_minor,
            "order_id": p.order_id,
            "merchant_order_reference": p.merchant_order_reference,
            "decline_reason": p.decline_reason,
            "failure_reason": p.failure_reason,
        }
        calls = []
        if p.order_id and status != pg.PAYMENT_STATUS_SUCCEEDED:
            calls.append(
                self._down.orders.UpdateOrderStatus(
                    order_pb2.UpdateOrderStatusRequest(
                        request_id=f"{p.payment_id}:order-cancel",
                        order_id=p.order_id,
                        status=order_pb2.ORDER_STATUS_CANCELLED,
                        reason=p.decline_reason or p.failure_reason,
                    )
                )
            )
        sent = await self._effects(
            p.payment_id,
            [
                *calls,
                self._notify(p.payment_id, p.merchant_id, p.webhook_url, event, payload),
                self._down.analytics.RecordEvent(
                    analytics_pb2.RecordEventRequest(
                        request_id=f"{p.payment_id}:analytics",
                        merchant_id=p.merchant_id,
                        event_type=event_type,
                        payment_id=p.payment_id,
                        amount=amount,
                        occur_time=_stamp(p.finish_time),
                    )
                ),
            ],
        )
        if sent:
            self._store.effects_done(p.payment_id)
        return sent

    def _notify(
        self, flow_id: str, merchant_id: str, url: str, event: str, payload: dict[str, object]
    ) -> aio.UnaryUnaryCall[
        notification_pb2.SendNotificationRequest, notification_pb2.SendNotificationResponse
    ]:
        return self._down.notifications.SendNotification(
            notification_pb2.SendNotificationRequest(
                request_id=f"{flow_id}:notify",
                merchant_id=merchant_id,
                event_type=event,
                # sort_keys: a resent webhook must have the very same body to be deduped.
                payload_json=json.dumps(payload, sort_keys=True),
                webhook_url=url,
            )
        )

    async def _effects(self, flow_id: str, calls: list[aio.UnaryUnaryCall]) -> bool:  # type: ignore[type-arg]  # calls of several message types
        sent = True
        for call in calls:
            try:
                await call
            except aio.AioRpcError as error:
                if not is_transient(error):
                    # Refused for good (e.g. a webhook URL that may not be reached): retrying
                    # the very same request could never succeed.
                    log.warning("effect of %s refused, not retried: %s", flow_id, error.details())
                    continue
                sent = False
                log.warning("effect of %s not sent, will retry: %s", flow_id, error.details())
        return sent

    # --- refunds ----------------------------------------------------------------------------

    async def run_refund(self, refund_id: str) -> pg.RefundPaymentResponse:
        """Drive a refund from its committed step to a terminal status, then its effects.

        Raises:
            PaymentPending: a step's outcome is unknown; the refund stays PENDING.
        """
        refund = self._store.refund(refund_id)
        while refund.step != RefundStep.FINISHED:
            refund = await self._refund_step(refund)
        if refund.effects_pending:
            await self.send_refund_effects(refund)
        payment = self._store.payment(refund.payment_id)
        return pg.RefundPaymentResponse(
            refund=refund_message(refund), payment=payment_message(payment)
        )

    async def _refund_step(self, r: RefundRecord) -> RefundRecord:
        if r.step == RefundStep.CREATED:
            payment = self._store.payment(r.payment_id)
            try:
                reply = await self._down.channel.RefundCharge(
                    ca.RefundChargeRequest(
                        request_id=f"{r.refund_id}:channel",
                        charge_id=payment.charge_id,
                        amount=common_pb2.Money(
                            amount_minor=r.amount_minor, currency_code=r.currency_code
                        ),
                        reason=r.reason,
                    )
                )
            except aio.AioRpcError as error:
                if is_transient(error):
                    raise PaymentPending(r.refund_id, r.step, error.details() or "") from error
                self._store.finish_refund(
                    r.refund_id,
                    pg.REFUND_STATUS_FAILED,
                    failure_reason=reason_of(error, "INTERNAL_ERROR"),
                )
                return self._store.refund(r.refund_id)
            return self._store.advance_refund(
                r.refund_id, RefundStep.REFUNDED, channel_refund_id=reply.refund.charge_refund_id
            )
        if r.step == RefundStep.REFUNDED:
            transaction_id = ledger.refund_transaction_id(r.refund_id)
            settled = common_pb2.Money(
                amount_minor=r.settlement_minor, currency_code=r.settlement_currency_code
            )
            try:
                await self._down.accounting.PostTransaction(
                    accounting_pb2.PostTransactionRequest(
                        request_id=f"{r.refund_id}:ledger",
                        transaction_id=transaction_id,
                        kind=accounting_pb2.TRANSACTION_KIND_REFUND,
                        reference_id=r.refund_id,
                        description=f"refund {r.refund_id} of payment {r.payment_id}",
                        postings=ledger.refund_postings(r.merchant_id, settled),
                    )
                )
            except aio.AioRpcError as error:
                # The channel already gave the money back, so the ledger must record it: the
                # refund stays pending (and is retried) whatever the ledger said.
                raise PaymentPending(r.refund_id, r.step, error.details() or "") from error
            return self._store.advance_refund(
                r.refund_id, RefundStep.POSTED, ledger_transaction_id=transaction_id
            )
        if r.step == RefundStep.POSTED:
            self._store.finish_refund(r.refund_id, pg.REFUND_STATUS_SUCCEEDED)
            return self._store.refund(r.refund_id)
        raise ValueError(f"refund {r.refund_id} has unknown step {r.step!r}")

    async def send_refund_effects(self, r: RefundRecord) -> bool:
        """Order status, webhook and analytics event of a succeeded refund (best effort)."""
        payment = self._store.payment(r.payment_id)
        payload = {
            "event": "payment.refunded",
            "refund_id": r.refund_id,
            "payment_id": r.payment_id,
            "merchant_id": r.merchant_id,
            "amount_minor": r.amount_minor,
            "currency_code": r.currency_code,
            "reason": r.reason,
        }
        sent = await self._effects(
            r.refund_id,
            [
                self._down.orders.UpdateOrderStatus(
                    order_pb2.UpdateOrderStatusRequest(
                        request_id=f"{r.refund_id}:order",
                        order_id=payment.order_id,
                        status=order_pb2.OrderStatus.ValueType(r.order_status),
                        reason=f"refund {r.refund_id}",
                    )
                ),
                self._notify(
                    r.refund_id, r.merchant_id, payment.webhook_url, "payment.refunded", payload
                ),
                self._down.analytics.RecordEvent(
                    analytics_pb2.RecordEventRequest(
                        request_id=f"{r.refund_id}:analytics",
                        merchant_id=r.merchant_id,
                        event_type=analytics_pb2.EVENT_TYPE_PAYMENT_REFUNDED,
                        payment_id=r.payment_id,
                        amount=common_pb2.Money(
                            amount_minor=r.amount_minor, currency_code=r.currency_code
                        ),
                        occur_time=_stamp(r.finish_time),
                    )
                ),
            ],
        )
        if sent:
            self._store.refund_effects_done(r.refund_id)
        return sent


def _stamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
