"""payment-gateway RPCs: validate, authenticate the merchant's key, claim, then run the flow.

Request ids are scoped to the authenticated merchant and fingerprinted without the API key:
a merchant that rotates its key and retries with the same request id gets the first result
replayed, and no derivative of a secret is stored. A replay still needs a valid key of the
same merchant (authentication runs first) but calls nothing that mutates.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TypeVar

import grpc
from grpc import aio

from interceptors.errors import PermissionDenied, Unauthenticated, Unavailable
from paymesh.merchant_auth.v1 import merchant_auth_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from services import validation as v
from services.bootstrap import Context
from services.payment_gateway.flow import PaymentFlow, PaymentPending, reason_of
from services.payment_gateway.store import (
    NewPayment,
    PaymentStore,
    payment_message,
    refund_message,
)

#: Longest API key accepted; anything longer is malformed input, not a key to look up.
MAX_API_KEY_LENGTH = 256
MAX_REFERENCE_LENGTH = 128
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def scoped_key(merchant_id: str, request_id: str) -> str:
    """The stored idempotency key: request ids are per merchant (``/`` is never in an id)."""
    return f"{merchant_id}/{request_id}"


def validate_create(request: pg.CreatePaymentRequest) -> None:
    """Raise InvalidArgument naming the first bad field of a CreatePayment request."""
    v.require_request_id("request_id", request.request_id)
    v.require_id("merchant_id", request.merchant_id)
    v.optional_text("api_key", request.api_key, limit=MAX_API_KEY_LENGTH)
    if not request.HasField("amount"):
        raise v.invalid("amount", "is required", reason="AMOUNT_INVALID")
    v.require_amount("amount", request.amount)
    if request.settlement_currency_code:
        v.require_currency("settlement_currency_code", request.settlement_currency_code)
    v.require_id("payment_method_token", request.payment_method_token)
    if request.customer_ip:
        try:
            ipaddress.ip_address(request.customer_ip)
        except ValueError:
            raise v.invalid(
                "customer_ip", f"{request.customer_ip[:80]!r} is not an IPv4 or IPv6 address"
            ) from None
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
    v.optional_text("api_key", request.api_key, limit=MAX_API_KEY_LENGTH)
    if request.HasField("amount"):
        v.require_amount("amount", request.amount)
    v.optional_text("reason", request.reason)


RequestT = TypeVar("RequestT", pg.CreatePaymentRequest, pg.RefundPaymentRequest)


def without_secret(request: RequestT) -> RequestT:
    """A copy of ``request`` without its API key: what the idempotency fingerprint covers."""
    body = type(request)()
    body.CopyFrom(request)
    body.ClearField("api_key")
    return body


class PaymentGatewayServicer(payment_gateway_pb2_grpc.PaymentGatewayServiceServicer):
    """Creates, reads, lists and refunds payments."""

    def __init__(self, store: PaymentStore, flow: PaymentFlow) -> None:
        self._store = store
        self._flow = flow

    async def _authenticate(self, api_key: str) -> merchant_auth_pb2.AuthenticateApiKeyResponse:
        """The key's merchant, or Unauthenticated; a transport failure escapes as UNAVAILABLE."""
        if not api_key:
            raise Unauthenticated("api_key is required", reason="API_KEY_INVALID")
        try:
            return await self._flow.downstreams.auth.AuthenticateApiKey(
                merchant_auth_pb2.AuthenticateApiKeyRequest(api_key=api_key)
            )
        except aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                raise Unauthenticated(
                    "the API key is not valid", reason=reason_of(error, "API_KEY_INVALID")
                ) from None
            if error.code() in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise PermissionDenied(
                    "the merchant of this API key may not take payments",
                    reason=reason_of(error, "MERCHANT_INACTIVE"),
                ) from None
            raise

    async def CreatePayment(
        self, request: pg.CreatePaymentRequest, context: Context
    ) -> pg.CreatePaymentResponse:
        validate_create(request)
        identity = await self._authenticate(request.api_key)
        if identity.merchant_id != request.merchant_id:
            raise Unauthenticated(
                f"the API key does not belong to merchant {request.merchant_id!r}",
                reason="API_KEY_INVALID",
            )
        if not identity.active:
            raise PermissionDenied(
                f"merchant {request.merchant_id!r} is suspended and may not take payments",
                reason="MERCHANT_INACTIVE",
                metadata={"merchant_id": request.merchant_id},
            )
        started = self._store.begin_payment(
            scoped_key(request.merchant_id, request.request_id),
            without_secret(request),
            NewPayment(
                merchant_id=request.merchant_id,
                amount=request.amount,
                settlement_currency_code=request.settlement_currency_code,
                payment_method_token=request.payment_method_token,
                customer_ip=request.customer_ip,
                customer_country_code=request.customer_country_code,
                description=request.description,
                merchant_order_reference=request.merchant_order_reference,
                webhook_url=identity.webhook_url,
            ),
        )
        if isinstance(started, pg.CreatePaymentResponse):
            return started  # a replay: nothing downstream is called again
        # Marked before the first await, so a recovery pass never drives it at the same time.
        with self._flow.driving(started.payment_id):
            try:
                payment = await self._flow.run_payment(started.payment_id)
            except PaymentPending as pending:
                raise Unavailable(
                    f"payment {pending.payment_id} is still pending ({pending.cause}); it will be"
                    " completed by recovery: retry with the same request_id to get its result",
                    reason="DOWNSTREAM_UNAVAILABLE",
                    metadata={"payment_id": pending.payment_id, "step": pending.step},
                ) from None
        assert payment is not None  # run without stop_after always reaches a terminal status
        return pg.CreatePaymentResponse(payment=payment)

    async def GetPayment(
        self, request: pg.GetPaymentRequest, context: Context
    ) -> pg.GetPaymentResponse:
        v.require_id("payment_id", request.payment_id)
        payment = self._store.payment(request.payment_id)
        return pg.GetPaymentResponse(
            payment=payment_message(payment),
            refunds=[refund_message(r) for r in self._store.refunds_of(payment.payment_id)],
        )

    async def ListPayments(
        self, request: pg.ListPaymentsRequest, context: Context
    ) -> pg.ListPaymentsResponse:
        v.require_id("merchant_id", request.merchant_id)
        if request.status not in pg.PaymentStatus.values():
            raise v.invalid("status", f"{request.status} is not a PaymentStatus")
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id, "status": int(request.status)}
        before = v.page_position(request.page_token, filters, v.SECONDS_AND_ID)
        rows, next_token = v.page_of(
            self._store.list_payments(
                merchant_id=request.merchant_id,
                status=request.status,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            # The stored float goes into the token as is, so the cursor is exact.
            lambda last: {"t": last.create_time, "id": last.payment_id},
        )
        return pg.ListPaymentsResponse(
            payments=[payment_message(r) for r in rows], next_page_token=next_token
        )

    async def RefundPayment(
        self, request: pg.RefundPaymentRequest, context: Context
    ) -> pg.RefundPaymentResponse:
        validate_refund(request)
        identity = await self._authenticate(request.api_key)
        payment = self._store.payment(request.payment_id)
        if payment.merchant_id != identity.merchant_id:
            # Same answer as for an unknown key: the caller learns nothing about the payment.
            raise Unauthenticated(
                f"the API key does not belong to the merchant of payment {request.payment_id!r}",
                reason="API_KEY_INVALID",
            )
        if request.HasField("amount") and request.amount.currency_code != payment.currency_code:
            raise v.invalid(
                "amount.currency_code",
                f"must be the payment's currency {payment.currency_code}",
            )
        # A suspended merchant may still refund: giving customers their money back is exactly
        # what should stay possible.
        started = self._store.begin_refund(
            scoped_key(identity.merchant_id, request.request_id),
            without_secret(request),
            payment_id=request.payment_id,
            amount_minor=request.amount.amount_minor if request.HasField("amount") else None,
            reason=request.reason,
        )
        if isinstance(started, pg.RefundPaymentResponse):
            return started
        with self._flow.driving(started.refund_id):
            try:
                return await self._flow.run_refund(started.refund_id)
            except PaymentPending as pending:
                raise Unavailable(
                    f"refund {pending.payment_id} is still pending ({pending.cause}); it will be"
                    " completed by recovery: retry with the same request_id to get its result",
                    reason="DOWNSTREAM_UNAVAILABLE",
                    metadata={"refund_id": pending.payment_id, "step": pending.step},
                ) from None

    async def GetPaymentSummary(
        self, request: pg.GetPaymentSummaryRequest, context: Context
    ) -> pg.GetPaymentSummaryResponse:
        v.require_id("merchant_id", request.merchant_id)
        return pg.GetPaymentSummaryResponse(summary=self._store.summary(request.merchant_id))
