"""The payment and refund flows: one persisted step at a time, each downstream call idempotent.

Every mutating downstream call carries a request id derived from the payment or refund id, so
running a flow again from any committed step (after a crash, or in the recovery pass) repeats
nothing: the channel dedupes the charge by its key, the ledger by the transaction id, and so on.
That is also why a step's result is committed together with the next state where nothing
lies between them: the order's result with CHARGING, the ledger posting (a payment's capture,
a refund's reversal) with the terminal status (a crash before that commit repeats the call,
which the callee dedupes: the ledger replays a post of the same request id and transaction).
The risk assessment is committed with the order's result too (no commit of ASSESSED of its
own): before CHARGING nothing moves money, and a crash before that commit repeats the
assessment (risk-service replays it by its request id) and CreateOrder (deduped the same way).
A live request's payment or refund is leased to this replica by the commit that created it
and released by the one that finishes it, so its run claims nothing; a recovery pass claims
the lease once, before it runs the steps.
A terminal status writes its announcements to the outbox in the same transaction (webhook,
analytics event, the order's new status); the flow only wakes the relay, it never waits for
them, so none of them delays the merchant's answer.

A live CreatePayment whose risk or order step fails without an answer has moved no money:
the payment is abandoned (its row and claim deleted, :class:`PaymentNotStarted`) so the
merchant's retry with the same request id runs afresh. The recovery pass leaves such a
payment pending instead, to be resumed once the dependency answers (abandoning it only past
the charge cutoff, when it could not be charged anyway).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from interceptors.errors import (
    CIRCUIT_OPEN_REASON,
    CONCURRENCY_LIMITED_REASON,
    CallError,
    Reason,
)
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.channel_adapter.v1 import channel_adapter_pb2 as ca
from paymesh.channel_adapter.v1 import channel_adapter_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.risk.v1 import risk_pb2, risk_pb2_grpc
from services.mesh import downstream
from services.mesh.clients import ClientFactory
from services.mesh.downstream import is_ambiguous as is_transient
from services.mesh.topology import Target
from services.payment_gateway import events, ledger
from services.payment_gateway.dependencies import DependencyWatch
from services.payment_gateway.events import order_id_of
from services.payment_gateway.outbox import BatchRoute, Route
from services.payment_gateway.store import (
    PAYMENT_LEASES,
    REFUND_LEASES,
    PaymentRecord,
    PaymentStore,
    RefundRecord,
    RefundStep,
    Step,
    payment_message,
    refund_message,
)
from services.storage.resumable import StepRunner
from services.storage.sql import ns_to_seconds

__all__ = ["Downstreams", "PaymentFlow", "PaymentNotStarted", "PaymentPending", "order_id_of"]

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

#: The downstream the next step of a payment calls first; recovery waits while it is down.
STEP_TARGETS = {
    Step.CREATED: Target.RISK,
    Step.ASSESSED: Target.ORDER,
    Step.CHARGING: Target.CHANNEL_ADAPTER,
    Step.CHARGED: Target.ACCOUNTING,
    Step.VOIDING: Target.CHANNEL_ADAPTER,
}
#: The same for refunds.
REFUND_STEP_TARGETS = {
    RefundStep.CREATED: Target.CHANNEL_ADAPTER,
    RefundStep.REFUNDED: Target.ACCOUNTING,
}
#: RetryInfo of a payment not started when neither the failure nor a breaker says when.
NOT_STARTED_RETRY_S = 1.0
#: Test hook, unset in every deployment: a file naming a payment step (``charging``, ...).
#: A payment whose flow reaches that committed step waits there for good, so a kill -9 test
#: kills the process at exactly that step (tests/integration/test_payment_flow_processes.py).
HOLD_FILE_VAR = "PAYMENT_GATEWAY_TEST_HOLD_FILE"


def reason_of(error: CallError, default: Reason = Reason.DOWNSTREAM_UNAVAILABLE) -> Reason:
    """The ErrorInfo reason a callee sent, or ``default`` when it sent none."""
    return downstream.reason_of(error, default)


class PaymentPending(Exception):
    """The flow stopped at a step whose outcome is not known yet; recovery will finish it."""

    def __init__(self, payment_id: str, step: str, cause: str) -> None:
        super().__init__(f"{payment_id} is pending at step {step!r}: {cause}")
        self.payment_id = payment_id
        self.step = step
        self.cause = cause


class PaymentNotStarted(Exception):
    """A live payment's dependency failed before any side effect; the payment was abandoned
    (its row and request id claim are gone), so the same request may be sent again."""

    def __init__(
        self, payment_id: str, *, target: str, reason: Reason, retry_after_s: float, cause: str
    ) -> None:
        super().__init__(f"{payment_id} not started: {target} failed ({cause})")
        self.payment_id = payment_id
        self.target = target
        self.reason = reason
        """CIRCUIT_OPEN, CONCURRENCY_LIMITED (refused locally) or DOWNSTREAM_UNAVAILABLE."""
        self.retry_after_s = retry_after_s
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
            risk=clients.stub(Target.RISK, risk_pb2_grpc.RiskServiceStub),
            orders=clients.stub(Target.ORDER, order_pb2_grpc.OrderServiceStub),
            channel=clients.stub(
                Target.CHANNEL_ADAPTER, channel_adapter_pb2_grpc.ChannelAdapterServiceStub
            ),
            accounting=clients.stub(Target.ACCOUNTING, accounting_pb2_grpc.AccountingServiceStub),
            notifications=clients.stub(
                Target.NOTIFICATION, notification_pb2_grpc.NotificationServiceStub
            ),
            analytics=clients.stub(Target.ANALYTICS, analytics_pb2_grpc.AnalyticsServiceStub),
        )

    def outbox_routes(self) -> dict[str, Route]:
        """How the outbox relay sends each kind of message the flows write: the single
        method, and the batch method that takes many of them in one call."""
        return {
            events.SEND_NOTIFICATION: Route(
                events.NOTIFICATIONS,
                notification_pb2.SendNotificationRequest,
                self.notifications.SendNotification,
                BatchRoute(
                    lambda items: notification_pb2.SendNotificationsRequest(notifications=items),
                    self.notifications.SendNotifications,
                ),
            ),
            events.RECORD_EVENT: Route(
                events.ANALYTICS,
                analytics_pb2.RecordEventRequest,
                self.analytics.RecordEvent,
                BatchRoute(
                    lambda items: analytics_pb2.RecordEventsRequest(events=items),
                    self.analytics.RecordEvents,
                ),
            ),
            events.UPDATE_ORDER_STATUS: Route(
                events.ORDERS,
                order_pb2.UpdateOrderStatusRequest,
                self.orders.UpdateOrderStatus,
                BatchRoute(
                    lambda items: order_pb2.UpdateOrderStatusesRequest(updates=items),
                    self.orders.UpdateOrderStatuses,
                ),
            ),
        }


def _risk_facts(p: PaymentRecord) -> dict[str, object]:
    """The assessment a payment carries (committed with the order step's result)."""
    return {
        "risk_assessment_id": p.risk_assessment_id,
        "risk_decision": p.risk_decision,
        "risk_score": p.risk_score,
    }


class PaymentFlow:
    """Runs payments and refunds step by step on the shared step runner: one task per
    payment or refund, shielded from the caller, so a client hanging up cannot stop a step
    midway and nothing runs the same steps twice."""

    def __init__(
        self,
        store: PaymentStore,
        downstreams: Downstreams,
        *,
        charge_cutoff_s: float,
        clock: Callable[[], float] = time.time,
        on_outbox: Callable[[], None] = lambda: None,
        watch: DependencyWatch | None = None,
        hold_file: Path | None = None,
    ) -> None:
        """Args:
        store: the gateway's own store.
        downstreams: the stubs to call.
        charge_cutoff_s: recovery never sends a first charge for a payment older than this;
            with no charge at the channel by then it ends FAILED instead.
        clock: time source.
        on_outbox: called after a transaction wrote outbox rows (wakes the relay).
        watch: the breakers, to tell a merchant when to retry a payment not started.
        hold_file: test hook (:data:`HOLD_FILE_VAR`): hold payments at the step it names.
        """
        self._store = store
        self._down = downstreams
        self._charge_cutoff_s = charge_cutoff_s
        self._clock = clock
        self._on_outbox = on_outbox
        self._watch = watch
        self._hold_file = hold_file
        self._driving: set[str] = set()
        # Leased: of the gateway's replicas, only the one holding a payment's lease drives it.
        # The store's terminal transaction releases it (done_releases).
        self._payments: StepRunner[PaymentRecord] = StepRunner(
            load=store.payment,
            done=lambda p: p.step == Step.FINISHED,
            step_of=_step_of,
            leases=store.leases,
            lease_prefix=PAYMENT_LEASES,
            done_releases=True,
        )
        self._refunds: StepRunner[RefundRecord] = StepRunner(
            load=store.refund,
            done=lambda r: r.step == RefundStep.FINISHED,
            step_of=_step_of,
            leases=store.leases,
            lease_prefix=REFUND_LEASES,
            done_releases=True,
        )

    @property
    def downstreams(self) -> Downstreams:
        """The stubs the flow calls."""
        return self._down

    def is_driving(self, flow_id: str) -> bool:
        """Whether some task is running the flow of this payment or refund right now."""
        return (
            flow_id in self._driving
            or self._payments.running(flow_id)
            or self._refunds.running(flow_id)
        )

    async def close(self) -> None:
        """Stop the flows in flight; each stays at its last committed step for recovery."""
        await self._payments.close()
        await self._refunds.close()

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
        self,
        payment_id: str,
        *,
        recovering: bool = False,
        claimed: bool = False,
        stop_after: str | None = None,
    ) -> pg.Payment | None:
        """Drive a payment from its committed step to a terminal status (its announcements
        are in the outbox by then; they are not waited for).

        ``claimed``: this replica holds the payment's lease already (``begin_payment``
        claimed it with the new row). ``stop_after`` stops once that step is committed
        (returns ``None``): it leaves the store exactly as a process killed right after that
        step would.

        Raises:
            PaymentNotStarted: (not ``recovering``) risk or order failed without an answer;
                the payment is gone and its request id free.
            PaymentPending: a step's outcome is unknown; the payment stays PENDING.
        """
        if stop_after is None:
            step = functools.partial(self._step, recovering=recovering)
            return payment_message(await self._payments.run(payment_id, step, claimed=claimed))
        # The crash tests' hook: in the caller's task, stopping once that step is committed.
        payment = self._store.payment(payment_id)
        while payment.step != Step.FINISHED:
            if payment.step == stop_after:
                return None
            payment = await self._step(payment, recovering=recovering)
        return payment_message(payment)

    async def _hold_if_named(self, p: PaymentRecord) -> None:
        """Test hook (:data:`HOLD_FILE_VAR`): wait for good while the hold file names p's step."""
        if self._hold_file is None or not self._hold_file.is_file():
            return
        if self._hold_file.read_text().strip() == p.step:
            log.warning("payment %s held at step %s (test hook)", p.payment_id, p.step)
            await asyncio.Event().wait()

    async def _step(self, p: PaymentRecord, *, recovering: bool) -> PaymentRecord:
        await self._hold_if_named(p)
        match p.step:
            case Step.CREATED:
                return await self._assess(p, recovering=recovering)
            case Step.ASSESSED:
                return await self._order(p, recovering=recovering)
            case Step.ORDERED:
                # Only in rows an earlier version wrote (the order step now commits CHARGING).
                return self._store.advance(p, Step.CHARGING)
            case Step.CHARGING:
                return await self._charge(p, recovering=recovering)
            case Step.CHARGED:
                return await self._post(p)
            case Step.POSTED:
                # Only in rows an earlier version wrote: the capture is in the ledger, so the
                # payment succeeded; the order's PAID goes through the outbox with the status.
                return self._finish(p, pg.PAYMENT_STATUS_SUCCEEDED)
            case Step.VOIDING:
                return await self._void(p, p.failure_reason or Reason.INTERNAL_ERROR)
        raise ValueError(f"payment {p.payment_id} has unknown step {p.step!r}")

    def _finish(
        self, p: PaymentRecord, status: pg.PaymentStatus.ValueType, **fields: object
    ) -> PaymentRecord:
        finished = self._store.finish(p.payment_id, status, **fields)
        self._on_outbox()
        return finished

    def _before_side_effects(
        self, p: PaymentRecord, target: str, error: CallError, *, recovering: bool
    ) -> Exception:
        """What a transient failure of ``target`` at a step before the channel raises.

        Live, the payment is abandoned and the merchant told when to retry. In recovery it
        stays pending for the next pass, unless it is older than the charge cutoff: then it
        could never be charged anyway, and is abandoned too.
        """
        cause = error.details() or error.code().name
        if recovering and self._clock() - ns_to_seconds(p.create_time_ns) <= self._charge_cutoff_s:
            return PaymentPending(p.payment_id, p.step, cause)
        reason = reason_of(error)
        if reason not in (CIRCUIT_OPEN_REASON, CONCURRENCY_LIMITED_REASON):
            reason = Reason.DOWNSTREAM_UNAVAILABLE
        delay = error.retry_delay_s
        if delay is None and self._watch is not None:
            delay = self._watch.open_left_s(target) or None  # our breaker may just have opened
        # This run sent CreateOrder, or (recovering) an earlier process may have before it
        # died: the assessment is committed only with the order's result.
        order_may_exist = target == Target.ORDER or recovering
        self._store.abandon(
            p.payment_id, reason=f"{target} {reason}", order_may_exist=order_may_exist
        )
        self._on_outbox()
        log.info("payment %s not started: %s %s (%s)", p.payment_id, target, reason, cause)
        return PaymentNotStarted(
            p.payment_id,
            target=target,
            reason=reason,
            retry_after_s=NOT_STARTED_RETRY_S if delay is None else delay,
            cause=cause,
        )

    async def _assess(self, p: PaymentRecord, *, recovering: bool) -> PaymentRecord:
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
        except CallError as error:
            if is_transient(error):
                raise self._before_side_effects(
                    p, Target.RISK, error, recovering=recovering
                ) from error
            # risk-service's definite refusal: a retry of the same payment gets the same.
            log.warning("risk refused %s: %s", p.payment_id, error.details())
            return self._finish(p, pg.PAYMENT_STATUS_FAILED, failure_reason=reason_of(error))
        assessment = reply.assessment
        facts = {
            "risk_assessment_id": assessment.assessment_id,
            "risk_decision": assessment.decision,
            "risk_score": assessment.score,
        }
        if assessment.decision == risk_pb2.RISK_DECISION_DECLINE:
            return self._finish(
                p, pg.PAYMENT_STATUS_DECLINED, decline_reason=Reason.RISK_DECLINED, **facts
            )
        # Not committed here: the order step commits the assessment with its own result (a
        # crash before that repeats the assessment, which risk-service replays).
        return dataclasses.replace(
            p,
            step=Step.ASSESSED,
            risk_assessment_id=assessment.assessment_id,
            risk_decision=assessment.decision,
            risk_score=assessment.score,
        )

    async def _order(self, p: PaymentRecord, *, recovering: bool) -> PaymentRecord:
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
        except CallError as error:
            if is_transient(error):
                raise self._before_side_effects(
                    p, Target.ORDER, error, recovering=recovering
                ) from error
            log.warning("order refused for %s: %s", p.payment_id, error.details())
            return self._finish(
                p, pg.PAYMENT_STATUS_FAILED, failure_reason=reason_of(error), **_risk_facts(p)
            )
        # The assessment, the order's result and "a charge may exist from here" in one
        # commit: a crash before it only repeats the assessment and CreateOrder (each replayed
        # by its request id), and neither moved money.
        return self._store.advance(p, Step.CHARGING, order_id=order_id, **_risk_facts(p))

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
            if (
                recovering
                and self._clock() - ns_to_seconds(p.create_time_ns) > self._charge_cutoff_s
            ):
                # Too late to charge a customer who never got an answer: use only a charge
                # that already exists, otherwise end the payment without charging.
                charge = await self._existing_charge(p)
                if charge is None:
                    return self._finish(
                        p, pg.PAYMENT_STATUS_FAILED, failure_reason=Reason.DOWNSTREAM_UNAVAILABLE
                    )
            else:
                charge = (await self._down.channel.Charge(self._charge_request(p))).charge
        except CallError as error:
            if is_transient(error):
                raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
            return await self._charge_refused(p, reason_of(error, Reason.INTERNAL_ERROR))
        return await self._charge_outcome(p, charge)

    async def _charge_refused(self, p: PaymentRecord, reason: str) -> PaymentRecord:
        """The adapter refused the charge outright; make sure no charge exists before FAILED."""
        try:
            charge = await self._existing_charge(p)
        except CallError as error:
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
                p,
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
                decline_reason=Reason.CHANNEL_DECLINED,
            )
        if charge.status == ca.CHARGE_STATUS_FAILED:
            return self._finish(
                p,
                pg.PAYMENT_STATUS_FAILED,
                charge_id=charge.charge_id,
                failure_reason=charge.failure_reason or Reason.DOWNSTREAM_UNAVAILABLE,
            )
        if charge.status == ca.CHARGE_STATUS_VOIDED:
            return self._finish(
                p,
                pg.PAYMENT_STATUS_VOIDED,
                charge_id=charge.charge_id,
                failure_reason=Reason.INTERNAL_ERROR,
            )
        raise PaymentPending(
            p.payment_id, p.step, f"charge is {ca.ChargeStatus.Name(charge.status)}"
        )

    def _capture_request(self, p: PaymentRecord) -> accounting_pb2.PostTransactionRequest:
        # From the stored row only, so a re-post after a crash is the very same transaction.
        settled = common_pb2.Money(
            amount_minor=p.settlement_minor, currency_code=p.settlement_currency_code
        )
        return accounting_pb2.PostTransactionRequest(
            request_id=f"{p.payment_id}:ledger",
            transaction_id=ledger.capture_transaction_id(p.payment_id),
            kind=accounting_pb2.TRANSACTION_KIND_PAYMENT,
            reference_id=p.payment_id,
            description=f"capture of payment {p.payment_id}",
            postings=ledger.capture_postings(p.merchant_id, settled),
        )

    async def _post(self, p: PaymentRecord) -> PaymentRecord:
        request = self._capture_request(p)
        transaction_id = request.transaction_id
        try:
            await self._down.accounting.PostTransaction(request)
        except CallError as error:
            if is_transient(error):
                raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
            # The ledger refuses this capture for good: give the customer's money back.
            log.error("ledger refused %s: %s; voiding", transaction_id, error.details())
            voiding = self._store.advance(
                p, Step.VOIDING, failure_reason=reason_of(error, Reason.INTERNAL_ERROR)
            )
            return await self._void(voiding, voiding.failure_reason)
        # Posted: the payment succeeded. The ledger's result commits with the terminal status
        # (a crash before it re-posts the same transaction id, which the ledger dedupes), and
        # the order's PAID is an outbox row of that commit, delivered after the reply.
        return self._finish(p, pg.PAYMENT_STATUS_SUCCEEDED, ledger_transaction_id=transaction_id)

    async def _void(self, p: PaymentRecord, reason: str) -> PaymentRecord:
        try:
            await self._down.channel.VoidCharge(
                ca.VoidChargeRequest(
                    request_id=f"{p.payment_id}:void", charge_id=p.charge_id, reason=reason
                )
            )
        except CallError as error:
            raise PaymentPending(p.payment_id, p.step, error.details() or "") from error
        return self._finish(p, pg.PAYMENT_STATUS_VOIDED, failure_reason=reason)

    # --- refunds ----------------------------------------------------------------------------

    def _reversal_request(self, r: RefundRecord) -> accounting_pb2.PostTransactionRequest:
        # From the stored row only, so a re-post after a crash is the very same transaction.
        settled = common_pb2.Money(
            amount_minor=r.settlement_minor, currency_code=r.settlement_currency_code
        )
        return accounting_pb2.PostTransactionRequest(
            request_id=f"{r.refund_id}:ledger",
            transaction_id=ledger.refund_transaction_id(r.refund_id),
            kind=accounting_pb2.TRANSACTION_KIND_REFUND,
            reference_id=r.refund_id,
            description=f"refund {r.refund_id} of payment {r.payment_id}",
            postings=ledger.refund_postings(r.merchant_id, settled),
        )

    async def run_refund(
        self, refund_id: str, *, claimed: bool = False
    ) -> pg.RefundPaymentResponse:
        """Drive a refund from its committed step to a terminal status (announced through
        the outbox).

        ``claimed``: this replica holds the refund's lease already (``begin_refund`` claimed
        it with the new row).

        Raises:
            PaymentPending: a step's outcome is unknown; the refund stays PENDING.
        """
        refund = await self._refunds.run(refund_id, self._refund_step, claimed=claimed)
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
            except CallError as error:
                if is_transient(error):
                    raise PaymentPending(r.refund_id, r.step, error.details() or "") from error
                self._store.finish_refund(
                    r.refund_id,
                    pg.REFUND_STATUS_FAILED,
                    failure_reason=reason_of(error, Reason.INTERNAL_ERROR),
                )
                self._on_outbox()
                return self._store.refund(r.refund_id)
            return self._store.advance_refund(
                r.refund_id, RefundStep.REFUNDED, channel_refund_id=reply.refund.charge_refund_id
            )
        if r.step == RefundStep.REFUNDED:
            request = self._reversal_request(r)
            try:
                await self._down.accounting.PostTransaction(request)
            except CallError as error:
                # The channel already gave the money back, so the ledger must record it: the
                # refund stays pending (and is retried) whatever the ledger said.
                raise PaymentPending(r.refund_id, r.step, error.details() or "") from error
            # Posted: the ledger's result commits with the terminal status. A crash before
            # that commit re-posts the same request (same request id and transaction id,
            # built from the row), which the ledger replays instead of posting it twice.
            self._store.finish_refund(
                r.refund_id,
                pg.REFUND_STATUS_SUCCEEDED,
                ledger_transaction_id=request.transaction_id,
            )
            self._on_outbox()
            return self._store.refund(r.refund_id)
        if r.step == RefundStep.POSTED:
            # Only in rows an earlier version wrote: the reversal is in the ledger already.
            self._store.finish_refund(r.refund_id, pg.REFUND_STATUS_SUCCEEDED)
            self._on_outbox()
            return self._store.refund(r.refund_id)
        raise ValueError(f"refund {r.refund_id} has unknown step {r.step!r}")


def _step_of(record: PaymentRecord | RefundRecord) -> str:
    return record.step
