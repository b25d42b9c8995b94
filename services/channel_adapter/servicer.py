"""channel-adapter RPCs: charge, refund and void at the payment channel; exchange rates.

Every mutating call to the channel carries a key derived from our ids (the Charge request id,
``refund:<request_id>``, ``void:<charge_id>``), so a retry, a replay after a crash or a
recovery pass can repeat it without moving money twice. A channel decline is a DECLINED
charge, not an error; an unreachable partner is UNAVAILABLE, never a traceback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import Reason
from interceptors.http import PartnerClient
from paymesh.channel_adapter.v1 import channel_adapter_pb2 as pb
from paymesh.channel_adapter.v1 import channel_adapter_pb2_grpc as pb_grpc
from paymesh.common.v1 import common_pb2
from services.channel_adapter.rates import Quote, RateCache, convert, parse_rate
from services.channel_adapter.store import (
    CAPTURED,
    CHANNEL_STATUS,
    ChannelOutcome,
    ChargeStore,
    Conversion,
    PendingCharge,
)
from services.mesh import validation as v
from services.mesh.bootstrap import Context
from services.mesh.errors import Aborted, FailedPrecondition, Unavailable
from services.mesh.partner import call_partner, path_of
from services.mesh.topology import Partner
from services.storage.shared_state import SharedCache

EXCHANGE_RATE = Partner.EXCHANGE_RATE
PAYMENT_CHANNEL = Partner.PAYMENT_CHANNEL
MAX_TOKEN_LENGTH = 200


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _outcome(status: int, body: Any) -> ChannelOutcome:
    """Our view of the channel's answer to a charge (or of a charge it lists)."""
    if status in (200, 201) and isinstance(body, dict) and body.get("id"):
        state = str(body.get("status", ""))
        ours = CHANNEL_STATUS.get(state)
        if ours is None:
            return ChannelOutcome(
                status=pb.CHARGE_STATUS_FAILED,
                channel_reference=str(body["id"]),
                failure_reason=f"the channel reported unknown status {state!r}",
            )
        return ChannelOutcome(
            status=ours,
            channel_reference=str(body["id"]),
            decline_reason=(
                str(body.get("decline_code") or "declined")
                if ours == pb.CHARGE_STATUS_DECLINED
                else ""
            ),
            refunded_minor=int(body.get("refunded_minor") or 0),
        )
    error = body.get("error") if isinstance(body, dict) else None
    return ChannelOutcome(
        status=pb.CHARGE_STATUS_FAILED,
        failure_reason=f"the channel refused the charge (HTTP {status}): {error or body!r}",
    )


class ChannelAdapterServicer(pb_grpc.ChannelAdapterServiceServicer):
    """Charges, refunds and voids at the channel; converts through the rate partner."""

    def __init__(
        self,
        store: ChargeStore,
        *,
        channel: PartnerClient,
        rates: PartnerClient,
        rate_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        shared_rates: SharedCache | None = None,
    ) -> None:
        self._store = store
        self._channel = channel
        self._rates = rates
        self._cache = RateCache(
            self._fetch_rate, ttl_s=rate_ttl_s, clock=clock, shared=shared_rates
        )
        # (method, request_id) executing in this process; an in-flight claim that is not
        # here was left by a crash (or a lost partner answer) and may be resumed.
        self._running: set[tuple[str, str]] = set()

    @contextlib.contextmanager
    def _run(self, method: str, request_id: str) -> Iterator[None]:
        key = (method, request_id)
        if key in self._running:
            raise Aborted(
                f"the first {method} with request_id {request_id!r} is still in flight;"
                " retry later",
                reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
            )
        self._running.add(key)
        try:
            yield
        finally:
            self._running.discard(key)

    # -- exchange rates ----------------------------------------------------
    async def _fetch_rate(self, source: str, target: str) -> Quote:
        status, body = await call_partner(
            self._rates,
            "GET",
            "/rates",
            query={"from": source, "to": target},
            reason=Reason.EXCHANGE_RATE_UNAVAILABLE,
        )
        try:
            if status != 200 or not isinstance(body, dict):
                raise ValueError(f"HTTP {status}: {body!r}")
            rate = parse_rate(body.get("rate"))
            as_of = datetime.fromisoformat(str(body.get("as_of"))).timestamp()
        except ValueError as exc:
            raise Unavailable(
                f"partner {EXCHANGE_RATE} gave no usable rate for {source}/{target}: {exc}",
                reason=Reason.EXCHANGE_RATE_UNAVAILABLE,
                metadata={"partner": EXCHANGE_RATE},
            ) from exc
        return Quote(source=source, target=target, rate=rate, as_of_s=as_of)

    async def _conversion(self, amount: common_pb2.Money, target: str) -> Conversion:
        if target == amount.currency_code:
            return Conversion(amount.amount_minor, target, "")
        quote, _ = await self._cache.get(amount.currency_code, target)
        converted = convert(amount.amount_minor, amount.currency_code, target, quote.rate)
        if not 0 < converted <= v.MAX_AMOUNT_MINOR:
            raise v.invalid(
                "amount.amount_minor",
                f"{amount.amount_minor} {amount.currency_code} is {converted} {target} minor"
                f" units at {quote.rate}, outside 1..{v.MAX_AMOUNT_MINOR}",
                reason=Reason.AMOUNT_INVALID,
            )
        return Conversion(converted, target, str(quote.rate))

    async def GetExchangeRate(
        self, request: pb.GetExchangeRateRequest, context: Context
    ) -> pb.GetExchangeRateResponse:
        source = v.require_currency("source_currency_code", request.source_currency_code)
        target = v.require_currency("target_currency_code", request.target_currency_code)
        if source == target:
            rate = pb.ExchangeRate(
                source_currency_code=source,
                target_currency_code=target,
                rate="1",
                as_of_time=_timestamp(time.time()),
            )
            return pb.GetExchangeRateResponse(exchange_rate=rate)
        quote, cached = await self._cache.get(source, target)
        return pb.GetExchangeRateResponse(
            exchange_rate=pb.ExchangeRate(
                source_currency_code=source,
                target_currency_code=target,
                rate=str(quote.rate),
                as_of_time=_timestamp(quote.as_of_s),
                from_cache=cached,
            )
        )

    # -- charges -----------------------------------------------------------
    async def Charge(self, request: pb.ChargeRequest, context: Context) -> pb.ChargeResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("payment_id", request.payment_id)
        v.require_id("merchant_id", request.merchant_id)
        v.require_amount("amount", request.amount)
        target = request.settlement_currency_code or request.amount.currency_code
        v.require_currency("settlement_currency_code", target)
        if not request.payment_method_token:
            raise v.invalid("payment_method_token", "is required")
        v.optional_text("payment_method_token", request.payment_method_token, limit=200)

        peek = self._store.peek("Charge", request.request_id, request)
        if peek.state == "done" and peek.response is not None:
            return pb.ChargeResponse.FromString(peek.response)
        with self._run("Charge", request.request_id):
            if peek.state == "in_flight":
                # Started earlier and never finished: send again with the same key.
                pending = self._store.pending_charge(request.request_id)
            else:
                conversion = await self._conversion(request.amount, target)
                pending = self._store.start_charge(request, conversion)
            return pb.ChargeResponse(charge=await self._send_charge(pending))

    async def _send_charge(self, pending: PendingCharge) -> pb.Charge:
        charge = pending.charge
        if charge.status != pb.CHARGE_STATUS_PENDING:
            return self._store.finish_charge(charge.charge_id, ChannelOutcome(charge.status))
        status, body = await call_partner(
            self._channel,
            "POST",
            "/charges",
            json={
                "amount_minor": charge.amount.amount_minor,
                "currency": charge.amount.currency_code,
                "card_token": pending.payment_method_token,
                "reference": charge.payment_id,
            },
            idempotency_key=charge.request_id,
        )
        return self._store.finish_charge(charge.charge_id, _outcome(status, body))

    # -- refunds -----------------------------------------------------------
    async def RefundCharge(
        self, request: pb.RefundChargeRequest, context: Context
    ) -> pb.RefundChargeResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("charge_id", request.charge_id)
        v.require_amount("amount", request.amount)
        v.optional_text("reason", request.reason)

        peek = self._store.peek("RefundCharge", request.request_id, request)
        if peek.state == "done" and peek.response is not None:
            return pb.RefundChargeResponse.FromString(peek.response)
        with self._run("RefundCharge", request.request_id):
            if peek.state == "in_flight":
                refund = self._store.pending_refund(request.request_id)
            else:
                refund = self._store.start_refund(request)
            charge = self._store.get(refund.charge_id)
            status, body = await call_partner(
                self._channel,
                "POST",
                path_of("/charges/{}/refunds", charge.channel_reference),
                json={"amount_minor": refund.amount.amount_minor},
                idempotency_key=f"refund:{request.request_id}",
            )
            if status in (200, 201) and isinstance(body, dict):
                return self._store.finish_refund(
                    refund.charge_refund_id, request.request_id, str(body.get("id", ""))
                )
            self._store.abandon_refund(refund.charge_refund_id, request.request_id)
            error = body.get("error") if isinstance(body, dict) else body
            raise FailedPrecondition(
                f"the channel refused the refund of charge {charge.charge_id!r}"
                f" (HTTP {status}): {error}",
                reason=Reason.REFUND_EXCEEDS_CAPTURED if status == 422 else Reason.INVALID_STATE,
                metadata={"charge_id": charge.charge_id, "partner": PAYMENT_CHANNEL},
            )

    # -- voids -------------------------------------------------------------
    async def VoidCharge(
        self, request: pb.VoidChargeRequest, context: Context
    ) -> pb.VoidChargeResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("charge_id", request.charge_id)
        v.optional_text("reason", request.reason)

        peek = self._store.peek("VoidCharge", request.request_id, request)
        if peek.state == "done" and peek.response is not None:
            return pb.VoidChargeResponse.FromString(peek.response)
        with self._run("VoidCharge", request.request_id):
            charge = (
                self._store.get(request.charge_id)
                if peek.state == "in_flight"
                else self._store.claim_void(request)
            )
            if charge.status == pb.CHARGE_STATUS_PENDING:
                if ("Charge", charge.request_id) in self._running:
                    self._store.release_void(request.request_id)
                    raise Aborted(
                        f"charge {charge.charge_id!r} is being sent to the channel; retry later",
                        reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
                        metadata={"charge_id": charge.charge_id},
                    )
                charge = await self._resolve_pending(charge)
            if charge.status in CAPTURED:
                await self._void_at_channel(charge)
            charge = self._store.complete_void(request.request_id, charge.charge_id)
            return pb.VoidChargeResponse(charge=charge)

    async def _void_at_channel(self, charge: pb.Charge) -> None:
        status, body = await call_partner(
            self._channel,
            "POST",
            path_of("/charges/{}/void", charge.channel_reference),
            json={},
            idempotency_key=f"void:{charge.charge_id}",
        )
        if status in (200, 201):
            self._store.set_status(charge.charge_id, pb.CHARGE_STATUS_VOIDED)
            return
        # Refused: learn what the channel thinks the charge is (refunded or voided already?).
        status, body = await call_partner(
            self._channel,
            "GET",
            path_of("/charges/{}", charge.channel_reference),
        )
        outcome = _outcome(status, body)
        if outcome.status in (pb.CHARGE_STATUS_VOIDED, pb.CHARGE_STATUS_REFUNDED):
            self._store.set_status(charge.charge_id, pb.CHARGE_STATUS_VOIDED)
            return
        raise FailedPrecondition(
            f"the channel refused to void charge {charge.charge_id!r} (HTTP {status})",
            reason=Reason.INVALID_STATE,
            metadata={"charge_id": charge.charge_id, "partner": PAYMENT_CHANNEL},
        )

    async def _channel_charges(self, payment_id: str) -> list[dict[str, Any]]:
        """The channel's charges for a payment (its ``reference``)."""
        status, body = await call_partner(
            self._channel,
            "GET",
            "/charges",
            query={"reference": payment_id},
        )
        if status != 200 or not isinstance(body, dict):
            raise Unavailable(
                f"partner {PAYMENT_CHANNEL} did not list the charges of {payment_id!r}"
                f" (HTTP {status})",
                reason=Reason.DOWNSTREAM_UNAVAILABLE,
                metadata={"partner": PAYMENT_CHANNEL},
            )
        # A malformed entry cannot be matched or adopted; skipping it beats failing recovery.
        return [
            c
            for c in body.get("charges", [])
            if isinstance(c, dict)
            and c.get("id")
            and isinstance(c.get("amount_minor"), int)
            and c.get("currency") in v.CURRENCY_EXPONENT
        ]

    def _unknown(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        known = self._store.known_references([str(c["id"]) for c in found])
        return [c for c in found if str(c["id"]) not in known]

    async def _resolve_pending(self, charge: pb.Charge) -> pb.Charge:
        """A PENDING charge nobody is sending: find it at the channel, or close it unsent."""
        for candidate in self._unknown(await self._channel_charges(charge.payment_id)):
            if (candidate.get("amount_minor"), candidate.get("currency")) == (
                charge.amount.amount_minor,
                charge.amount.currency_code,
            ):
                return self._store.link(charge.charge_id, _outcome(200, candidate))
        return self._store.resolve_unsent(charge.charge_id)

    # -- reads -------------------------------------------------------------
    async def GetCharge(
        self, request: pb.GetChargeRequest, context: Context
    ) -> pb.GetChargeResponse:
        v.require_id("charge_id", request.charge_id)
        charge = self._store.get(request.charge_id)
        return pb.GetChargeResponse(charge=charge, refunds=self._store.refunds(charge.charge_id))

    async def ListCharges(
        self, request: pb.ListChargesRequest, context: Context
    ) -> pb.ListChargesResponse:
        v.require_id("payment_id", request.payment_id)
        size = v.page_size(request.page_size)
        filters = {"payment_id": request.payment_id}
        after = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        if after is None:
            await self._reconcile(request.payment_id)
        charges, next_token = v.page_of(
            self._store.list(payment_id=request.payment_id, after=after, limit=size + 1),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.charge_id},
        )
        return pb.ListChargesResponse(charges=charges, next_page_token=next_token)

    async def _reconcile(self, payment_id: str) -> None:
        """Make the local charges of a payment reflect the channel's.

        Only needed when the store has nothing for the payment or an unresolved PENDING
        charge: then our own write may have been lost, and recovery must learn from the
        channel whether money moved. An unreachable channel is UNAVAILABLE, never "none".
        """
        local = self._store.for_payment(payment_id)
        unresolved = [
            c
            for c in local
            if c.status == pb.CHARGE_STATUS_PENDING
            and ("Charge", c.request_id) not in self._running
        ]
        if local and not unresolved:
            return
        for found in self._unknown(await self._channel_charges(payment_id)):
            outcome = _outcome(200, found)
            match = next(
                (
                    c
                    for c in unresolved
                    if (c.amount.amount_minor, c.amount.currency_code)
                    == (found.get("amount_minor"), found.get("currency"))
                ),
                None,
            )
            if match is not None:
                unresolved.remove(match)
                self._store.link(match.charge_id, outcome)
                continue
            amount = common_pb2.Money(
                amount_minor=found["amount_minor"], currency_code=found["currency"]
            )
            self._store.adopt(payment_id, amount, outcome)
