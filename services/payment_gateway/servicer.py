"""payment-gateway RPCs: validate, scope to the calling merchant, claim, then run the flow.

Merchants call with their API key in metadata; the bootstrap's gate has authenticated it
before a servicer runs (:func:`services.mesh.authz.current_merchant`). Every read is scoped to
that merchant, and another merchant's payment is NOT_FOUND with the very error of a missing
one. Request ids are per merchant: two merchants using the same id never replay each other's
payment, and a merchant that rotates its key and retries gets its first result replayed.

A dependency that fails before any side effect is UNAVAILABLE with RetryInfo and leaves the
request id free; one that fails after (a charge may exist) is UNAVAILABLE too, while the
payment stays pending for recovery and a retry replays its final result. The answer never
waits for webhooks or events: the outbox delivers them.
"""

from __future__ import annotations

import re

from interceptors.errors import Reason
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from services.mesh import validation as v
from services.mesh.authz import AuthenticatedMerchant, current_merchant, merchant_scope
from services.mesh.bootstrap import Context
from services.mesh.errors import PermissionDenied, Unauthenticated, Unavailable
from services.payment_gateway.flow import PaymentFlow, PaymentNotStarted, PaymentPending
from services.payment_gateway.store import (
    NewPayment,
    PaymentStore,
    payment_message,
    refund_message,
)

MAX_REFERENCE_LENGTH = 128
#: RetryInfo of a payment or refund left pending, when the caller set no recovery interval.
PENDING_RETRY_S = 30.0
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def scoped_key(merchant_id: str, request_id: str) -> str:
    """The stored idempotency key: request ids are per merchant (``/`` is never in an id)."""
    return f"{merchant_id}/{request_id}"


def validate_create(request: pg.CreatePaymentRequest) -> None:
    """Raise InvalidArgument naming the first bad field of a CreatePayment request.

    ``merchant_id`` is checked by :func:`services.mesh.authz.merchant_scope` instead: a merchant
    may leave it empty, and any id but its own is NOT_FOUND.
    """
    v.require_request_id("request_id", request.request_id)
    if not request.HasField("amount"):
        raise v.invalid("amount", "is required", reason=Reason.AMOUNT_INVALID)
    v.require_amount("amount", request.amount)
    if request.settlement_currency_code:
        v.require_currency("settlement_currency_code", request.settlement_currency_code)
    v.require_id("payment_method_token", request.payment_method_token)
    v.optional_ip("customer_ip", request.customer_ip)  # a zone (%...) could be of any length
    if request.customer_country_code and not _COUNTRY.match(request.customer_country_code):
        raise v.invalid(
            "customer_country_code",
            "must be an ISO 3166-1 alpha-2 code such as 'DE',"
            f" got {request.customer_country_code[:80]!r}",
        )
    v.optional_text("description", request.description)
    v.optional_text(
        "merchant_order_reference", request.merchant_order_reference, limit=MAX_REFERENCE_LENGTH
    )


def validate_refund(request: pg.RefundPaymentRequest) -> None:
    """Raise InvalidArgument naming the first bad field of a RefundPayment request."""
    v.require_request_id("request_id", request.request_id)
    v.require_id("payment_id", request.payment_id)
    if request.HasField("amount"):
        v.require_amount("amount", request.amount)
    v.optional_text("reason", request.reason)


def for_merchant(request: pg.CreatePaymentRequest, merchant_id: str) -> pg.CreatePaymentRequest:
    """``request`` naming ``merchant_id`` explicitly: what the idempotency fingerprint covers,
    so a retry that names the merchant is the same body as a first try that left it empty."""
    body = pg.CreatePaymentRequest()
    body.CopyFrom(request)
    body.merchant_id = merchant_id
    return body


def calling_merchant(method: str) -> AuthenticatedMerchant:
    """The merchant whose API key the gate authenticated for this call.

    Only merchants move money here; no mesh identity is granted these methods, so the one way
    to get here without a merchant is a plaintext development mesh called without a key.

    Raises:
        Unauthenticated: CREDENTIALS_MISSING, the call carried no API key.
    """
    merchant = current_merchant()
    if merchant is None:
        raise Unauthenticated(
            f"{method} needs the merchant's API key in metadata 'authorization: Bearer <key>'",
            reason=Reason.CREDENTIALS_MISSING,
            metadata={"method": method},
        )
    return merchant


class PaymentGatewayServicer(payment_gateway_pb2_grpc.PaymentGatewayServiceServicer):
    """Creates, reads, lists and refunds payments, each merchant only its own."""

    def __init__(
        self, store: PaymentStore, flow: PaymentFlow, *, pending_retry_s: float = PENDING_RETRY_S
    ) -> None:
        """``pending_retry_s``: the RetryInfo of an answer that left work to recovery (its
        next pass has it done by then, if the dependency is back)."""
        self._store = store
        self._flow = flow
        self._pending_retry_s = pending_retry_s

    async def CreatePayment(
        self, request: pg.CreatePaymentRequest, context: Context
    ) -> pg.CreatePaymentResponse:
        validate_create(request)
        merchant = calling_merchant("CreatePayment")
        merchant_id = merchant_scope(request.merchant_id)
        if not merchant.active:
            raise PermissionDenied(
                f"merchant {merchant_id!r} is suspended and may not take payments",
                reason=Reason.MERCHANT_INACTIVE,
                metadata={"merchant_id": merchant_id},
            )
        started = self._store.begin_payment(
            scoped_key(merchant_id, request.request_id),
            for_merchant(request, merchant_id),
            NewPayment(
                merchant_id=merchant_id,
                amount=request.amount,
                settlement_currency_code=request.settlement_currency_code,
                payment_method_token=request.payment_method_token,
                customer_ip=request.customer_ip,
                customer_country_code=request.customer_country_code,
                description=request.description,
                merchant_order_reference=request.merchant_order_reference,
                webhook_url=merchant.webhook_url,
            ),
        )
        if isinstance(started, pg.CreatePaymentResponse):
            return started  # a replay: nothing downstream is called again
        # Leased to this replica by the commit that created it, so no peer's recovery pass
        # takes it; marked before the first await, so this process's own pass leaves it too.
        with self._flow.driving(started.payment_id):
            try:
                payment = await self._flow.run_payment(started.payment_id, claimed=True)
            except PaymentNotStarted as refused:
                raise Unavailable(
                    f"payment not started: {refused.target} is unavailable ({refused.cause});"
                    " nothing was charged and the request_id is free: retry the same request"
                    f" in {refused.retry_after_s:.1f} s",
                    reason=refused.reason,
                    retry_delay_s=refused.retry_after_s,
                    metadata={"target": refused.target},
                ) from None
            except PaymentPending as pending:
                raise Unavailable(
                    f"payment {pending.payment_id} is still pending ({pending.cause}); it will be"
                    " completed by recovery: retry with the same request_id to get its result",
                    reason=Reason.DOWNSTREAM_UNAVAILABLE,
                    retry_delay_s=self._pending_retry_s,
                    metadata={"payment_id": pending.payment_id, "step": pending.step},
                ) from None
        assert payment is not None  # run without stop_after always reaches a terminal status
        return pg.CreatePaymentResponse(payment=payment)

    async def GetPayment(
        self, request: pg.GetPaymentRequest, context: Context
    ) -> pg.GetPaymentResponse:
        v.require_id("payment_id", request.payment_id)
        # merchant_scope("") is the calling merchant's id, or "" (any merchant) for the mesh.
        payment = self._store.payment(request.payment_id, merchant_id=merchant_scope(""))
        return pg.GetPaymentResponse(
            payment=payment_message(payment),
            refunds=[refund_message(r) for r in self._store.refunds_of(payment.payment_id)],
        )

    async def ListPayments(
        self, request: pg.ListPaymentsRequest, context: Context
    ) -> pg.ListPaymentsResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        if request.status not in pg.PaymentStatus.values():
            raise v.invalid("status", f"{request.status} is not a PaymentStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": merchant_id, "status": int(request.status)}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        rows, next_token = v.page_of(
            self._store.list_payments(
                merchant_id=merchant_id,
                status=request.status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.create_time_ns, "id": last.payment_id},
        )
        return pg.ListPaymentsResponse(
            payments=[payment_message(r) for r in rows], next_page_token=next_token
        )

    async def RefundPayment(
        self, request: pg.RefundPaymentRequest, context: Context
    ) -> pg.RefundPaymentResponse:
        validate_refund(request)
        merchant_id = calling_merchant("RefundPayment").merchant_id
        payment = self._store.payment(request.payment_id, merchant_id=merchant_id)
        if request.HasField("amount") and request.amount.currency_code != payment.currency_code:
            raise v.invalid(
                "amount.currency_code",
                f"must be the payment's currency {payment.currency_code}",
            )
        # A suspended merchant may still refund: giving customers their money back is exactly
        # what should stay possible.
        started = self._store.begin_refund(
            scoped_key(merchant_id, request.request_id),
            request,
            payment_id=request.payment_id,
            amount_minor=request.amount.amount_minor if request.HasField("amount") else None,
            reason=request.reason,
        )
        if isinstance(started, pg.RefundPaymentResponse):
            return started
        with self._flow.driving(started.refund_id):
            try:
                return await self._flow.run_refund(started.refund_id, claimed=True)
            except PaymentPending as pending:
                raise Unavailable(
                    f"refund {pending.payment_id} is still pending ({pending.cause}); it will be"
                    " completed by recovery: retry with the same request_id to get its result",
                    reason=Reason.DOWNSTREAM_UNAVAILABLE,
                    retry_delay_s=self._pending_retry_s,
                    metadata={"refund_id": pending.payment_id, "step": pending.step},
                ) from None

    async def GetPaymentSummary(
        self, request: pg.GetPaymentSummaryRequest, context: Context
    ) -> pg.GetPaymentSummaryResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        return pg.GetPaymentSummaryResponse(summary=self._store.summary(merchant_id))
