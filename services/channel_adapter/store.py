"""channel-adapter's data: charges and their refunds, and the idempotency keys of both.

A charge row is written PENDING (with its conversion fixed) in the same transaction that
claims the request id, before the channel is called; the channel's answer then completes
it. A crash in between leaves a PENDING row that a retry or recovery resolves, never a
second charge: the channel dedupes by the same key and ``channel_reference`` is unique.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from interceptors.errors import Reason
from paymesh.channel_adapter.v1 import channel_adapter_pb2 as pb
from paymesh.common.v1 import common_pb2
from services.mesh.errors import Aborted, FailedPrecondition, NotFound
from services.storage import idempotency
from services.storage.sql import Database, Earlier, Row, Statements, seconds_to_ns, timestamp

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS charges (
    charge_id TEXT PRIMARY KEY,
    -- NULL for a charge learned from the channel whose own write was lost.
    request_id TEXT UNIQUE,
    payment_id TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    settlement_minor INTEGER NOT NULL CHECK (settlement_minor >= 0),
    settlement_currency_code TEXT NOT NULL,
    exchange_rate TEXT NOT NULL,
    payment_method_token TEXT NOT NULL,
    status INTEGER NOT NULL,
    channel_reference TEXT UNIQUE,
    refunded_minor INTEGER NOT NULL DEFAULT 0
        CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    decline_reason TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_payment ON charges (payment_id, create_time_ns, charge_id);
CREATE TABLE IF NOT EXISTS charge_refunds (
    charge_refund_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    charge_id TEXT NOT NULL REFERENCES charges (charge_id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'succeeded')),
    channel_reference TEXT UNIQUE,
    reason TEXT NOT NULL,
    create_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_by_charge ON charge_refunds (charge_id, create_time_ns);
"""
    + idempotency.SCHEMA
)

#: Statuses from which money can still be refunded or voided.
CAPTURED = (pb.CHARGE_STATUS_SUCCEEDED, pb.CHARGE_STATUS_PARTIALLY_REFUNDED)
#: The channel's charge states and ours.
CHANNEL_STATUS = {
    "captured": pb.CHARGE_STATUS_SUCCEEDED,
    "declined": pb.CHARGE_STATUS_DECLINED,
    "partially_refunded": pb.CHARGE_STATUS_PARTIALLY_REFUNDED,
    "refunded": pb.CHARGE_STATUS_REFUNDED,
    "voided": pb.CHARGE_STATUS_VOIDED,
}


def _money(amount_minor: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount_minor, currency_code=currency)


def _charge(row: Row) -> pb.Charge:
    return pb.Charge(
        charge_id=row["charge_id"],
        payment_id=row["payment_id"],
        merchant_id=row["merchant_id"],
        request_id=row["request_id"] or "",
        amount=_money(row["amount_minor"], row["currency_code"]),
        settlement_amount=_money(row["settlement_minor"], row["settlement_currency_code"]),
        exchange_rate=row["exchange_rate"],
        status=row["status"],
        channel_reference=row["channel_reference"] or "",
        refunded_amount=_money(row["refunded_minor"], row["currency_code"]),
        decline_reason=row["decline_reason"],
        failure_reason=row["failure_reason"],
        create_time=timestamp(row["create_time_ns"]),
        update_time=timestamp(row["update_time_ns"]),
    )


def _refund(row: Row) -> pb.ChargeRefund:
    return pb.ChargeRefund(
        charge_refund_id=row["charge_refund_id"],
        charge_id=row["charge_id"],
        amount=_money(row["amount_minor"], row["currency_code"]),
        channel_reference=row["channel_reference"] or "",
        reason=row["reason"],
        create_time=timestamp(row["create_time_ns"]),
    )


#: What an earlier request with the same id left behind.
Peek = Earlier


def _completed_concurrently(request_id: str) -> Aborted:
    return Aborted(
        f"request_id {request_id!r} completed concurrently; retry to replay",
        reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
    )


@dataclass(frozen=True, slots=True)
class Conversion:
    """The settlement side of a charge, fixed before the channel is called."""

    amount_minor: int
    """Amount in minor units of ``currency``."""
    currency: str
    """ISO 4217 settlement currency."""
    rate: str
    """Rate applied as a decimal string; empty when there was no conversion."""


@dataclass(frozen=True, slots=True)
class PendingCharge:
    """A charge to send to the channel (first time or again, with the same key)."""

    charge: pb.Charge
    """The charge as stored."""
    payment_method_token: str
    """Token to charge."""


@dataclass(frozen=True, slots=True)
class ChannelOutcome:
    """What the channel said about a charge."""

    status: int
    """Our ChargeStatus for it."""
    channel_reference: str = ""
    """The channel's charge id, empty when the channel refused the request."""
    decline_reason: str = ""
    """The channel's decline code."""
    failure_reason: str = ""
    """Why the charge could not be made."""
    refunded_minor: int = 0
    """What the channel has refunded of it."""


class ChargeStore:
    """Charges and refunds; each write idempotent by request id and channel id.

    A charge, refund or void spans a channel call, so its request id is claimed with the
    first write, completed with the last, and released if the channel refused it.

    Args:
        clock: seconds since the epoch (tests pass their own); stored as nanoseconds.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # -- idempotency -------------------------------------------------------
    def peek(self, method: str, request_id: str, request: Message) -> Peek:
        """Whether ``request_id`` is new, done or unfinished, without claiming it.

        Raises:
            InvalidArgument: the id was used with a different body.
        """
        # Looked up only to run the checks; the real claim comes with the first write.
        return self._db.earlier(method, request, request_id=request_id)

    # -- charges -----------------------------------------------------------
    def start_charge(self, request: pb.ChargeRequest, conversion: Conversion) -> PendingCharge:
        """Claim the request id and write the PENDING charge in one transaction."""
        with self._db.transaction() as tx:
            kept_in = ("charges", "request_id")
            if (
                self._db.claim(tx, "Charge", request, pb.ChargeResponse, kept_in=kept_in)
                is not None
            ):
                raise _completed_concurrently(request.request_id)  # after this one peeked
            now = self._db.clock_ns()
            charge_id = f"ch_{uuid.uuid4().hex[:24]}"
            tx.run(
                "INSERT INTO charges (charge_id, request_id, payment_id, merchant_id,"
                " amount_minor, currency_code, settlement_minor, settlement_currency_code,"
                " exchange_rate, payment_method_token, status, create_time_ns, update_time_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    charge_id,
                    request.request_id,
                    request.payment_id,
                    request.merchant_id,
                    request.amount.amount_minor,
                    request.amount.currency_code,
                    conversion.amount_minor,
                    conversion.currency,
                    conversion.rate,
                    request.payment_method_token,
                    pb.CHARGE_STATUS_PENDING,
                    now,
                    now,
                ),
            )
            # The row just written, from its values (the columns not named take defaults).
            charge = pb.Charge(
                charge_id=charge_id,
                payment_id=request.payment_id,
                merchant_id=request.merchant_id,
                request_id=request.request_id,
                amount=_money(request.amount.amount_minor, request.amount.currency_code),
                settlement_amount=_money(conversion.amount_minor, conversion.currency),
                exchange_rate=conversion.rate,
                status=pb.CHARGE_STATUS_PENDING,
                refunded_amount=_money(0, request.amount.currency_code),
                create_time=timestamp(now),
                update_time=timestamp(now),
            )
            return PendingCharge(charge, request.payment_method_token)

    def pending_charge(self, request_id: str) -> PendingCharge:
        """The charge an unfinished Charge request wrote, to send again."""
        row = self._db.one("SELECT * FROM charges WHERE request_id = ?", (request_id,))
        if row is None:
            raise Aborted(
                f"request_id {request_id!r} is in flight; retry later",
                reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
            )
        return PendingCharge(_charge(row), row["payment_method_token"])

    def finish_charge(self, charge_id: str, outcome: ChannelOutcome) -> pb.Charge:
        """Record the channel's answer (if still PENDING) and complete the Charge request."""
        with self._db.transaction() as tx:
            row = self._require(charge_id)
            charge = _charge(row)
            if row["status"] == pb.CHARGE_STATUS_PENDING:
                now = self._apply(tx, charge_id, outcome)
                # The row as the update left it, without reading it back.
                charge.status = pb.ChargeStatus.ValueType(outcome.status)
                charge.channel_reference = outcome.channel_reference
                charge.decline_reason = outcome.decline_reason
                charge.failure_reason = outcome.failure_reason
                charge.update_time.CopyFrom(timestamp(now))
                charge.refunded_amount.amount_minor = max(
                    row["refunded_minor"], outcome.refunded_minor
                )
            self._complete(tx, charge)
            return charge

    def resolve_unsent(self, charge_id: str) -> pb.Charge:
        """A PENDING charge the channel never received: VOIDED, and its request completed.

        Completing the Charge request id means a late retry replays VOIDED instead of
        charging a payment that recovery already gave up.
        """
        with self._db.transaction() as tx:
            tx.run(
                "UPDATE charges SET status = ?, failure_reason = ?, update_time_ns = ?"
                " WHERE charge_id = ? AND status = ?",
                (
                    pb.CHARGE_STATUS_VOIDED,
                    "voided before the channel received it",
                    self._db.clock_ns(),
                    charge_id,
                    pb.CHARGE_STATUS_PENDING,
                ),
            )
            return self._complete_charge(tx, charge_id)

    def link(self, charge_id: str, outcome: ChannelOutcome) -> pb.Charge:
        """Attach a PENDING charge to the channel charge found for it; complete its request."""
        with self._db.transaction() as tx:
            self._apply(tx, charge_id, outcome)
            return self._complete_charge(tx, charge_id)

    def adopt(self, payment_id: str, amount: common_pb2.Money, outcome: ChannelOutcome) -> None:
        """Record a channel charge that has no local row (our own write was lost)."""
        now = self._db.clock_ns()
        with self._db.transaction() as tx:
            tx.insert(
                "charges",
                {
                    "charge_id": f"ch_{outcome.channel_reference}",
                    "request_id": None,
                    "payment_id": payment_id,
                    "merchant_id": "",
                    "amount_minor": amount.amount_minor,
                    "currency_code": amount.currency_code,
                    "settlement_minor": amount.amount_minor,
                    "settlement_currency_code": amount.currency_code,
                    "exchange_rate": "",
                    "payment_method_token": "",
                    "status": outcome.status,
                    "channel_reference": outcome.channel_reference,
                    "refunded_minor": outcome.refunded_minor,
                    "decline_reason": outcome.decline_reason,
                    "failure_reason": "",
                    "create_time_ns": now,
                    "update_time_ns": now,
                },
                unless_exists=True,
            )

    def _apply(self, tx: Statements, charge_id: str, outcome: ChannelOutcome) -> int:
        """Write the channel's answer on the charge; returns its new ``update_time_ns``."""
        now = self._db.clock_ns()
        if outcome.channel_reference:
            # A charge adopted from the channel while this one was unresolved is the same
            # charge: the row with the request id wins.
            tx.run(
                "DELETE FROM charges WHERE channel_reference = ? AND request_id IS NULL"
                " AND charge_id != ?",
                (outcome.channel_reference, charge_id),
            )
        tx.run(
            "UPDATE charges SET status = ?, channel_reference = ?, decline_reason = ?,"
            " failure_reason = ?, update_time_ns = ?,"
            " refunded_minor = CASE WHEN refunded_minor > ? THEN refunded_minor ELSE ? END"
            " WHERE charge_id = ?",
            (
                outcome.status,
                outcome.channel_reference or None,
                outcome.decline_reason,
                outcome.failure_reason,
                now,
                outcome.refunded_minor,
                outcome.refunded_minor,
                charge_id,
            ),
        )
        return now

    def _complete_charge(self, tx: Statements, charge_id: str) -> pb.Charge:
        charge = _charge(self._require(charge_id))
        self._complete(tx, charge)
        return charge

    def _complete(self, tx: Statements, charge: pb.Charge) -> None:
        if charge.request_id:
            self._db.complete(tx, "Charge", charge.request_id, pb.ChargeResponse(charge=charge))

    def set_status(self, charge_id: str, status: int) -> pb.Charge:
        """Set a charge's status after the channel confirmed it."""
        with self._db.transaction() as tx:
            tx.run(
                "UPDATE charges SET status = ?, update_time_ns = ? WHERE charge_id = ?",
                (status, self._db.clock_ns(), charge_id),
            )
            return _charge(self._require(charge_id))

    # -- refunds -----------------------------------------------------------
    def start_refund(self, request: pb.RefundChargeRequest) -> pb.ChargeRefund:
        """Claim the request id and reserve the amount as a pending refund, atomically.

        Raises:
            NotFound: no such charge.
            FailedPrecondition: the charge is not captured, the currency differs, or the
                amount exceeds what is captured and not yet refunded (or being refunded).
        """
        with self._db.transaction() as tx:
            kept_in = ("charge_refunds", "request_id")
            replay = self._db.claim(
                tx, "RefundCharge", request, pb.RefundChargeResponse, kept_in=kept_in
            )
            if replay is not None:
                raise _completed_concurrently(request.request_id)
            row = self._require(request.charge_id)
            if row["status"] not in CAPTURED:
                raise FailedPrecondition(
                    f"charge {request.charge_id!r} is {pb.ChargeStatus.Name(row['status'])};"
                    " only a captured charge can be refunded",
                    reason=Reason.INVALID_STATE,
                    metadata={"charge_id": request.charge_id},
                )
            if request.amount.currency_code != row["currency_code"]:
                raise FailedPrecondition(
                    f"refund currency {request.amount.currency_code} differs from the charge"
                    f" currency {row['currency_code']}",
                    reason=Reason.CURRENCY_UNSUPPORTED,
                    metadata={"charge_id": request.charge_id},
                )
            pending = tx.aggregate(
                "SELECT COALESCE(SUM(amount_minor), 0) AS reserved FROM charge_refunds"
                " WHERE charge_id = ? AND state = 'pending'",
                (request.charge_id,),
            )
            reserved = pending["reserved"]
            left = row["amount_minor"] - row["refunded_minor"] - reserved
            if request.amount.amount_minor > left:
                raise FailedPrecondition(
                    f"refund of {request.amount.amount_minor} exceeds the {left} minor units"
                    f" of charge {request.charge_id!r} that are captured and not refunded",
                    reason=Reason.REFUND_EXCEEDS_CAPTURED,
                    metadata={"charge_id": request.charge_id, "refundable_minor": str(left)},
                )
            refund_id = f"chr_{uuid.uuid4().hex[:24]}"
            tx.run(
                "INSERT INTO charge_refunds (charge_refund_id, request_id, charge_id,"
                " amount_minor, currency_code, state, reason, create_time_ns)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    refund_id,
                    request.request_id,
                    request.charge_id,
                    request.amount.amount_minor,
                    request.amount.currency_code,
                    request.reason,
                    self._db.clock_ns(),
                ),
            )
            return _refund(self._refund_row(refund_id))

    def pending_refund(self, request_id: str) -> pb.ChargeRefund:
        """The refund an unfinished RefundCharge request reserved, to send again."""
        row = self._db.one("SELECT * FROM charge_refunds WHERE request_id = ?", (request_id,))
        if row is None:
            raise Aborted(
                f"request_id {request_id!r} is in flight; retry later",
                reason=Reason.IDEMPOTENCY_KEY_IN_FLIGHT,
            )
        return _refund(row)

    def finish_refund(
        self, refund_id: str, request_id: str, channel_reference: str
    ) -> pb.RefundChargeResponse:
        """Record the channel's refund, move the charge's refunded total, complete the request."""
        with self._db.transaction() as tx:
            refund = self._refund_row(refund_id)
            if refund["state"] == "pending":
                tx.run(
                    "UPDATE charge_refunds SET state = 'succeeded', channel_reference = ?"
                    " WHERE charge_refund_id = ?",
                    (channel_reference, refund_id),
                )
                charge = self._require(refund["charge_id"])
                refunded = charge["refunded_minor"] + refund["amount_minor"]
                status = (
                    pb.CHARGE_STATUS_REFUNDED
                    if refunded == charge["amount_minor"]
                    else pb.CHARGE_STATUS_PARTIALLY_REFUNDED
                )
                tx.run(
                    "UPDATE charges SET refunded_minor = ?, status = ?, update_time_ns = ?"
                    " WHERE charge_id = ?",
                    (refunded, status, self._db.clock_ns(), refund["charge_id"]),
                )
            response = pb.RefundChargeResponse(
                refund=_refund(self._refund_row(refund_id)),
                charge=_charge(self._require(refund["charge_id"])),
            )
            self._db.complete(tx, "RefundCharge", request_id, response)
            return response

    def abandon_refund(self, refund_id: str, request_id: str) -> None:
        """The channel refused the refund: drop the reservation and free the request id."""
        with self._db.transaction() as tx:
            tx.run(
                "DELETE FROM charge_refunds WHERE charge_refund_id = ? AND state = 'pending'",
                (refund_id,),
            )
            self._db.release(tx, "RefundCharge", request_id)

    # -- voids -------------------------------------------------------------
    def claim_void(self, request: pb.VoidChargeRequest) -> pb.Charge:
        """Claim the VoidCharge request id; the charge to void (NotFound if none)."""
        with self._db.transaction() as tx:
            charge = _charge(self._require(request.charge_id))
            if self._db.claim(tx, "VoidCharge", request, pb.VoidChargeResponse) is not None:
                raise _completed_concurrently(request.request_id)
            return charge

    def release_void(self, request_id: str) -> None:
        """Free a VoidCharge request id that did nothing (so a retry runs afresh)."""
        with self._db.transaction() as tx:
            self._db.release(tx, "VoidCharge", request_id)

    def complete_void(self, request_id: str, charge_id: str) -> pb.Charge:
        """Store the VoidCharge response with the charge as it now is."""
        with self._db.transaction() as tx:
            charge = _charge(self._require(charge_id))
            self._db.complete(tx, "VoidCharge", request_id, pb.VoidChargeResponse(charge=charge))
            return charge

    # -- reads -------------------------------------------------------------
    def get(self, charge_id: str) -> pb.Charge:
        """The charge; NotFound if there is none."""
        return _charge(self._require(charge_id))

    def refunds(self, charge_id: str) -> list[pb.ChargeRefund]:
        """The charge's completed refunds, oldest first."""
        rows = self._db.all(
            "SELECT * FROM charge_refunds WHERE charge_id = ? AND state = 'succeeded'"
            " ORDER BY create_time_ns, charge_refund_id",
            (charge_id,),
        )
        return [_refund(row) for row in rows]

    def for_payment(self, payment_id: str) -> list[pb.Charge]:
        """Every charge of a payment, oldest first."""
        rows = self._db.all(
            "SELECT * FROM charges WHERE payment_id = ? ORDER BY create_time_ns, charge_id",
            (payment_id,),
        )
        return [_charge(row) for row in rows]

    def known_references(self, references: list[str]) -> set[str]:
        """Which of the channel's charge ids already have a local row."""
        if not references:
            return set()
        marks = ", ".join("?" * len(references))
        rows = self._db.all(
            f"SELECT channel_reference FROM charges WHERE channel_reference IN ({marks})",
            references,
        )
        return {row[0] for row in rows}

    def list(
        self, *, payment_id: str, after: tuple[int, str] | None, limit: int
    ) -> list[pb.Charge]:
        """A payment's charges oldest first, after the ``(create_time_ns, charge_id)`` cursor."""
        rows = self._db.page(
            "charges",
            order=("create_time_ns", "charge_id"),
            cursor=after,
            limit=limit,
            where={"payment_id": payment_id},
            newest_first=False,
        )
        return [_charge(row) for row in rows]

    def _refund_row(self, refund_id: str) -> Row:
        row = self._db.one("SELECT * FROM charge_refunds WHERE charge_refund_id = ?", (refund_id,))
        assert row is not None  # callers pass the id of a refund they read or wrote
        return row

    def _require(self, charge_id: str) -> Row:
        row = self._db.one("SELECT * FROM charges WHERE charge_id = ?", (charge_id,))
        if row is None:
            raise NotFound(
                f"charge {charge_id!r} does not exist", metadata={"charge_id": charge_id}
            )
        return row
