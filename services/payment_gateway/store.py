"""payment-gateway's data: payments and refunds with the step each has reached, and its outbox.

A payment's row is written in the same transaction that claims its request id, and its
``step`` is committed after every downstream step, so after a crash the recovery pass knows
exactly where each unfinished payment stopped (a step whose call the callee dedupes commits
its result with the next step's state). Reaching a terminal status, completing the
idempotency claim with the final response and writing the outbox rows that announce it
(webhook, analytics event, order status) happen in one transaction.

The lease of a new payment or refund (which replica drives it) is claimed in the transaction
that creates it, so no peer's recovery pass can take it between its creation and its claim,
and released in the one that gives it its terminal status: a successful payment is five
commits (create, risk, order, charge, terminal status), a refund three (create, channel,
terminal status with its ledger posting).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interceptors.errors import Reason
from paymesh.common.v1 import common_pb2
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg
from services.mesh.errors import FailedPrecondition, NotFound
from services.payment_gateway import outbox
from services.payment_gateway.events import abandoned_order, payment_events, refund_events
from services.payment_gateway.ledger import (
    order_status_for,
    refund_settlement_share,
    status_after_refunds,
)
from services.storage import idempotency, leases
from services.storage.sql import Database, Row, Statements, seconds_to_ns, timestamp

CREATE_METHOD = "CreatePayment"
REFUND_METHOD = "RefundPayment"
#: The first part of a payment's and of a refund's lease key (``payments/<payment_id>``).
PAYMENT_LEASES = "payments"
REFUND_LEASES = "refunds"


class Step:
    """Where a payment's flow stands; each value is committed once the step is done."""

    CREATED = "created"
    """Row written and request id claimed; nothing called downstream yet."""
    ASSESSED = "assessed"
    """Risk approved (or flagged for review)."""
    ORDERED = "ordered"
    """Order recorded at order-service (rows of earlier versions only: the order's result is
    now committed with CHARGING)."""
    CHARGING = "charging"
    """Order recorded; about to call (or calling) the channel: from here a charge may exist."""
    CHARGED = "charged"
    """The channel captured the money."""
    POSTED = "posted"
    """The capture is in the ledger (rows of earlier versions only: the ledger's result is
    now committed with the terminal status)."""
    VOIDING = "voiding"
    """The captured charge is being voided because the payment cannot complete."""
    FINISHED = "finished"
    """Terminal status reached and the idempotency claim completed."""


class RefundStep:
    """Where a refund's flow stands."""

    CREATED = "created"
    """Row written, amount reserved against the payment; the channel may be called."""
    REFUNDED = "refunded"
    """The channel refunded the money."""
    POSTED = "posted"
    """The reversal is in the ledger (rows of earlier versions only: the ledger's result is
    now committed with the terminal status)."""
    FINISHED = "finished"
    """Terminal status reached and the idempotency claim completed."""


SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    step TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    settlement_currency_code TEXT NOT NULL,
    payment_method_token TEXT NOT NULL,
    customer_ip TEXT NOT NULL,
    customer_country_code TEXT NOT NULL,
    description TEXT NOT NULL,
    merchant_order_reference TEXT NOT NULL,
    webhook_url TEXT NOT NULL,
    captured_minor INTEGER NOT NULL DEFAULT 0,
    refunded_minor INTEGER NOT NULL DEFAULT 0 CHECK (refunded_minor <= captured_minor),
    settlement_minor INTEGER NOT NULL DEFAULT 0,
    settlement_refunded_minor INTEGER NOT NULL DEFAULT 0,
    exchange_rate TEXT NOT NULL DEFAULT '',
    order_id TEXT NOT NULL DEFAULT '',
    charge_id TEXT NOT NULL DEFAULT '',
    ledger_transaction_id TEXT NOT NULL DEFAULT '',
    risk_assessment_id TEXT NOT NULL DEFAULT '',
    risk_decision INTEGER NOT NULL DEFAULT 0,
    risk_score INTEGER NOT NULL DEFAULT 0,
    decline_reason TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL,
    finish_time_ns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS payments_by_merchant
    ON payments (merchant_id, create_time_ns, payment_id);
CREATE INDEX IF NOT EXISTS payments_unfinished ON payments (step) WHERE step != 'finished';
CREATE TABLE IF NOT EXISTS refunds (
    refund_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    payment_id TEXT NOT NULL REFERENCES payments (payment_id),
    merchant_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    settlement_minor INTEGER NOT NULL,
    settlement_currency_code TEXT NOT NULL,
    status INTEGER NOT NULL,
    step TEXT NOT NULL,
    reason TEXT NOT NULL,
    channel_refund_id TEXT NOT NULL DEFAULT '',
    ledger_transaction_id TEXT NOT NULL DEFAULT '',
    failure_reason TEXT NOT NULL DEFAULT '',
    order_status INTEGER NOT NULL DEFAULT 0,
    create_time_ns INTEGER NOT NULL,
    update_time_ns INTEGER NOT NULL,
    finish_time_ns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS refunds_by_payment ON refunds (payment_id, create_time_ns);
"""
    + idempotency.SCHEMA
    + outbox.SCHEMA
)
#: The column of databases written before the outbox: 1 while a finished payment's or
#: refund's webhook, event and order status were still to be sent (see ``_adopt_legacy``).
_LEGACY_EFFECTS_COLUMN = "effects_pending"


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One row of ``payments``."""

    payment_id: str
    idempotency_key: str
    merchant_id: str
    status: int
    step: str
    amount_minor: int
    currency_code: str
    settlement_currency_code: str
    payment_method_token: str
    customer_ip: str
    customer_country_code: str
    description: str
    merchant_order_reference: str
    webhook_url: str
    captured_minor: int
    refunded_minor: int
    settlement_minor: int
    settlement_refunded_minor: int
    exchange_rate: str
    order_id: str
    charge_id: str
    ledger_transaction_id: str
    risk_assessment_id: str
    risk_decision: int
    risk_score: int
    decline_reason: str
    failure_reason: str
    create_time_ns: int
    update_time_ns: int
    finish_time_ns: int

    @property
    def amount(self) -> common_pb2.Money:
        """The requested amount."""
        return common_pb2.Money(amount_minor=self.amount_minor, currency_code=self.currency_code)


@dataclass(frozen=True, slots=True)
class RefundRecord:
    """One row of ``refunds``."""

    refund_id: str
    idempotency_key: str
    payment_id: str
    merchant_id: str
    amount_minor: int
    currency_code: str
    settlement_minor: int
    settlement_currency_code: str
    status: int
    step: str
    reason: str
    channel_refund_id: str
    ledger_transaction_id: str
    failure_reason: str
    order_status: int
    create_time_ns: int
    update_time_ns: int
    finish_time_ns: int


_PAYMENT_COLUMNS = frozenset(f.name for f in dataclasses.fields(PaymentRecord))
_REFUND_COLUMNS = frozenset(f.name for f in dataclasses.fields(RefundRecord))


def _payment_record(row: Row) -> PaymentRecord:
    # By name: a database of an older version may have columns this one no longer reads.
    return PaymentRecord(**{name: row[name] for name in _PAYMENT_COLUMNS})


def _refund_record(row: Row) -> RefundRecord:
    return RefundRecord(**{name: row[name] for name in _REFUND_COLUMNS})


def payment_lease(payment_id: str) -> str:
    """The lease key of a payment: whichever replica holds it drives the payment's flow."""
    return leases.work_key(PAYMENT_LEASES, payment_id)


def refund_lease(refund_id: str) -> str:
    """The lease key of a refund."""
    return leases.work_key(REFUND_LEASES, refund_id)


_REFUNDABLE = (pg.PAYMENT_STATUS_SUCCEEDED, pg.PAYMENT_STATUS_PARTIALLY_REFUNDED)
#: Refund statuses that hold part of the captured amount (a pending refund reserves it).
_HOLDING = (pg.REFUND_STATUS_PENDING, pg.REFUND_STATUS_SUCCEEDED)


def _money(amount: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount, currency_code=currency)


def payment_message(p: PaymentRecord) -> pg.Payment:
    """The contract's view of a payment row."""
    return pg.Payment(
        payment_id=p.payment_id,
        merchant_id=p.merchant_id,
        status=p.status,  # type: ignore[arg-type]  # stored as the enum's int value
        amount=p.amount,
        captured_amount=_money(p.captured_minor, p.currency_code),
        refunded_amount=_money(p.refunded_minor, p.currency_code),
        settlement_amount=_money(p.settlement_minor, p.settlement_currency_code),
        exchange_rate=p.exchange_rate,
        order_id=p.order_id,
        charge_id=p.charge_id,
        ledger_transaction_id=p.ledger_transaction_id,
        risk_assessment_id=p.risk_assessment_id,
        risk_decision=p.risk_decision,  # type: ignore[arg-type]  # stored as the enum's int value
        risk_score=p.risk_score,
        decline_reason=p.decline_reason,
        failure_reason=p.failure_reason,
        description=p.description,
        merchant_order_reference=p.merchant_order_reference,
        customer_country_code=p.customer_country_code,
        create_time=timestamp(p.create_time_ns),
        update_time=timestamp(p.update_time_ns),
    )


def refund_message(r: RefundRecord) -> pg.Refund:
    """The contract's view of a refund row."""
    return pg.Refund(
        refund_id=r.refund_id,
        payment_id=r.payment_id,
        merchant_id=r.merchant_id,
        amount=_money(r.amount_minor, r.currency_code),
        status=r.status,  # type: ignore[arg-type]  # stored as the enum's int value
        reason=r.reason,
        channel_refund_id=r.channel_refund_id,
        ledger_transaction_id=r.ledger_transaction_id,
        failure_reason=r.failure_reason,
        create_time=timestamp(r.create_time_ns),
        update_time=timestamp(r.update_time_ns),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NewPayment:
    """What CreatePayment knows before the first downstream step."""

    merchant_id: str
    amount: common_pb2.Money
    settlement_currency_code: str
    payment_method_token: str
    customer_ip: str
    customer_country_code: str
    description: str
    merchant_order_reference: str
    webhook_url: str


class PaymentStore:
    """Payments and refunds, each claimed atomically with its request id.

    Args:
        clock: seconds since the epoch (the flow's clock; tests pass their own); stored as
            nanoseconds.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[str], str] | None = None,
        owner: str | None = None,
    ) -> None:
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))
        self._new_id = new_id or (lambda prefix: f"{prefix}_{uuid.uuid4().hex[:24]}")
        self.outbox = outbox.Outbox(self._db, clock=clock)
        """The messages the store's transactions wrote, for the relay to send."""
        self.leases = leases.Leases(self._db, owner or leases.replica_id("payment-gateway"))
        """Who drives which payment, refund and outbox destination among the replicas."""
        self._adopt_legacy()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # --- payments ---------------------------------------------------------------------------

    def begin_payment(
        self, key: str, request: pg.CreatePaymentRequest, new: NewPayment
    ) -> PaymentRecord | pg.CreatePaymentResponse:
        """Claim ``key`` and write the PENDING payment, or return the replay of a finished one.

        ``key`` is the request id scoped to the merchant (two merchants' ids never collide);
        ``request`` is what the fingerprint is taken of. The new payment's lease is this
        replica's from the same commit (its flow runs with ``claimed``).

        Raises:
            InvalidArgument: the key was used with a different body.
            Aborted: the first request with this key is still in flight.
            AlreadyExists: the key's record outlived its retention but its payment is kept.
        """
        with self._db.transaction() as tx:
            replay = self._db.claim(
                tx,
                CREATE_METHOD,
                request,
                pg.CreatePaymentResponse,
                request_id=key,
                kept_in=("payments", "idempotency_key"),
            )
            if replay is not None:
                return replay
            now = self._db.clock_ns()
            payment_id = self._new_id("pay")
            tx.run(
                "INSERT INTO payments (payment_id, idempotency_key, merchant_id, status, step,"
                " amount_minor, currency_code, settlement_currency_code, payment_method_token,"
                " customer_ip, customer_country_code, description, merchant_order_reference,"
                " webhook_url, create_time_ns, update_time_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    payment_id,
                    key,
                    new.merchant_id,
                    pg.PAYMENT_STATUS_PENDING,
                    Step.CREATED,
                    new.amount.amount_minor,
                    new.amount.currency_code,
                    new.settlement_currency_code or new.amount.currency_code,
                    new.payment_method_token,
                    new.customer_ip,
                    new.customer_country_code,
                    new.description,
                    new.merchant_order_reference,
                    new.webhook_url,
                    now,
                    now,
                ),
            )
            self.leases.require(payment_lease(payment_id), tx=tx)
            return self._payment(payment_id)

    def advance(self, payment: PaymentRecord | str, step: str, **fields: Any) -> PaymentRecord:
        """Commit that ``step`` is done, with the facts it produced.

        Given the payment's current row (its flow is the one writer of an unfinished
        payment), the new row is that row with the change, without reading it back.
        """
        if isinstance(payment, str):
            payment = self._payment(payment)
        fields["step"] = step
        fields.setdefault("update_time_ns", self._db.clock_ns())
        self._update("payments", _PAYMENT_COLUMNS, "payment_id", payment.payment_id, **fields)
        return dataclasses.replace(payment, **fields)

    def finish(
        self, payment_id: str, status: pg.PaymentStatus.ValueType, **fields: Any
    ) -> PaymentRecord:
        """Set the terminal status, complete the request id's claim and release the
        payment's lease, in one transaction; returns the finished row."""
        with self._db.transaction() as tx:
            now = self._db.clock_ns()
            self._update(
                "payments",
                _PAYMENT_COLUMNS,
                "payment_id",
                payment_id,
                tx=tx,
                status=status,
                step=Step.FINISHED,
                finish_time_ns=now,
                **fields,
            )
            record = self._payment(payment_id)
            payment = payment_message(record)
            self._db.complete(
                tx,
                CREATE_METHOD,
                record.idempotency_key,
                pg.CreatePaymentResponse(payment=payment),
            )
            self.outbox.add(tx, payment_id, payment_events(record))
            self.leases.release(payment_lease(payment_id), tx=tx)
            return record

    def abandon(self, payment_id: str, *, reason: str, order_may_exist: bool = False) -> None:
        """Forget a payment that failed before any side effect, and free its request id.

        Only a payment that has not reached the channel can be abandoned. One whose order may
        have been created (its CreateOrder went unanswered: ``order_may_exist``, or a row an
        earlier version left at ASSESSED) leaves an outbox row that cancels that order, so
        nothing it started stays open.

        Raises:
            FailedPrecondition: INVALID_STATE, the payment is past its order step.
        """
        with self._db.transaction() as tx:
            record = self._payment(payment_id)
            if record.step not in (Step.CREATED, Step.ASSESSED):
                raise FailedPrecondition(
                    f"payment {payment_id!r} is at step {record.step!r}; it cannot be abandoned",
                    reason=Reason.INVALID_STATE,
                    metadata={"payment_id": payment_id},
                )
            if order_may_exist or record.step == Step.ASSESSED:
                self.outbox.add(tx, payment_id, abandoned_order(record, reason))
            tx.run("DELETE FROM payments WHERE payment_id = ?", (payment_id,))
            self._db.release(tx, CREATE_METHOD, record.idempotency_key)

    def payment(self, payment_id: str, *, merchant_id: str = "") -> PaymentRecord:
        """The payment row; NotFound (PAYMENT_NOT_FOUND) if there is none.

        Args:
            merchant_id: if given, a payment of another merchant is NotFound too, with the
                very error of a missing one, so the caller learns nothing about it.
        """
        return self._payment(payment_id, merchant_id=merchant_id)

    def unfinished_payments(self) -> list[str]:
        """Ids of payments whose flow has not reached a terminal status, oldest first."""
        rows = self._db.all(
            "SELECT payment_id FROM payments WHERE step != ? ORDER BY create_time_ns",
            (Step.FINISHED,),
        )
        return [row["payment_id"] for row in rows]

    def list_payments(
        self, *, merchant_id: str, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[PaymentRecord]:
        """A merchant's payments newest first, past the ``(create_time_ns, id)`` cursor."""
        where: dict[str, object] = {"merchant_id": merchant_id}
        if status:
            where["status"] = status
        rows = self._db.page(
            "payments",
            order=("create_time_ns", "payment_id"),
            cursor=before,
            limit=limit,
            where=where,
        )
        return [_payment_record(row) for row in rows]

    def summary(self, merchant_id: str) -> pg.PaymentSummary:
        """Counts per status and totals per currency of a merchant's payments."""
        summary = pg.PaymentSummary(merchant_id=merchant_id)
        for row in self._db.all(
            "SELECT status, COUNT(*) AS n FROM payments WHERE merchant_id = ?"
            " GROUP BY status ORDER BY status",
            (merchant_id,),
        ):
            summary.status_counts.add(status=row["status"], count=row["n"])
            summary.payment_count += row["n"]
        for row in self._db.all(
            "SELECT currency_code, COUNT(*) AS n, SUM(captured_minor) AS captured,"
            " SUM(refunded_minor) AS refunded FROM payments WHERE merchant_id = ?"
            " GROUP BY currency_code ORDER BY currency_code",
            (merchant_id,),
        ):
            code = row["currency_code"]
            summary.currency_totals.add(
                currency_code=code,
                payment_count=row["n"],
                captured=_money(row["captured"], code),
                refunded=_money(row["refunded"], code),
            )
        last = self._db.aggregate(
            "SELECT MAX(create_time_ns) AS t FROM payments WHERE merchant_id = ?", (merchant_id,)
        )["t"]
        if last is not None:
            summary.last_payment_time.CopyFrom(timestamp(last))
        return summary

    # --- refunds ----------------------------------------------------------------------------

    def begin_refund(
        self,
        key: str,
        request: pg.RefundPaymentRequest,
        *,
        payment_id: str,
        amount_minor: int | None,
        reason: str,
    ) -> RefundRecord | pg.RefundPaymentResponse:
        """Claim ``key`` and reserve the refund against the payment, or return the replay.

        ``amount_minor`` of ``None`` means everything still refundable. The new refund's
        lease is this replica's from the same commit (its flow runs with ``claimed``).

        Raises:
            NotFound: the payment does not exist.
            FailedPrecondition: INVALID_STATE (not refundable) or REFUND_EXCEEDS_CAPTURED.
        """
        with self._db.transaction() as tx:
            replay = self._db.claim(
                tx,
                REFUND_METHOD,
                request,
                pg.RefundPaymentResponse,
                request_id=key,
                kept_in=("refunds", "idempotency_key"),
            )
            if replay is not None:
                return replay
            payment = self._payment(payment_id)
            if payment.status not in _REFUNDABLE:
                state = pg.PaymentStatus.Name(pg.PaymentStatus.ValueType(payment.status))
                raise FailedPrecondition(
                    f"payment {payment_id!r} is {state}; only"
                    " SUCCEEDED or PARTIALLY_REFUNDED payments can be refunded",
                    reason=Reason.INVALID_STATE,
                    metadata={"payment_id": payment_id},
                )
            held = tx.aggregate(
                "SELECT COALESCE(SUM(amount_minor), 0) AS amount,"
                " COALESCE(SUM(settlement_minor), 0) AS settlement"
                " FROM refunds WHERE payment_id = ? AND status IN (?, ?)",
                (payment_id, *_HOLDING),
            )
            refundable = payment.captured_minor - held["amount"]
            amount = refundable if amount_minor is None else amount_minor
            if amount <= 0 or amount > refundable:
                raise FailedPrecondition(
                    f"refund of {amount} {payment.currency_code} exceeds the {refundable} still"
                    f" refundable of the {payment.captured_minor} captured",
                    reason=Reason.REFUND_EXCEEDS_CAPTURED,
                    metadata={"payment_id": payment_id, "refundable_minor": str(refundable)},
                )
            settlement = refund_settlement_share(
                amount=amount,
                captured=payment.captured_minor,
                settlement=payment.settlement_minor,
                refundable=refundable,
                settlement_refundable=payment.settlement_minor - held["settlement"],
            )
            now = self._db.clock_ns()
            refund_id = self._new_id("ref")
            tx.run(
                "INSERT INTO refunds (refund_id, idempotency_key, payment_id, merchant_id,"
                " amount_minor, currency_code, settlement_minor, settlement_currency_code,"
                " status, step, reason, create_time_ns, update_time_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    refund_id,
                    key,
                    payment_id,
                    payment.merchant_id,
                    amount,
                    payment.currency_code,
                    settlement,
                    payment.settlement_currency_code,
                    pg.REFUND_STATUS_PENDING,
                    RefundStep.CREATED,
                    reason,
                    now,
                    now,
                ),
            )
            self.leases.require(refund_lease(refund_id), tx=tx)
            return self._refund(refund_id)

    def advance_refund(self, refund_id: str, step: str, **fields: Any) -> RefundRecord:
        """Commit that refund ``step`` is done, with the facts it produced."""
        self._update("refunds", _REFUND_COLUMNS, "refund_id", refund_id, step=step, **fields)
        return self._refund(refund_id)

    def finish_refund(
        self,
        refund_id: str,
        status: pg.RefundStatus.ValueType,
        *,
        failure_reason: str = "",
        ledger_transaction_id: str = "",
    ) -> pg.RefundPaymentResponse:
        """Set the refund's terminal status, apply it to the payment, complete the claim and
        release the refund's lease, in one transaction.

        Args:
            ledger_transaction_id: the reversal's ledger transaction, posted just before
                (committed here with the status; empty keeps the stored one).
        """
        with self._db.transaction() as tx:
            now = self._db.clock_ns()
            refund = self._refund(refund_id)
            order_status = 0
            if status == pg.REFUND_STATUS_SUCCEEDED:
                payment = self._payment(refund.payment_id)
                refunded = payment.refunded_minor + refund.amount_minor
                payment_status = status_after_refunds(
                    captured=payment.captured_minor, refunded=refunded
                )
                self._update(
                    "payments",
                    _PAYMENT_COLUMNS,
                    "payment_id",
                    payment.payment_id,
                    tx=tx,
                    status=payment_status,
                    refunded_minor=refunded,
                    settlement_refunded_minor=payment.settlement_refunded_minor
                    + refund.settlement_minor,
                )
                order_status = int(order_status_for(payment_status))
            self._update(
                "refunds",
                _REFUND_COLUMNS,
                "refund_id",
                refund_id,
                tx=tx,
                status=status,
                step=RefundStep.FINISHED,
                failure_reason=failure_reason,
                order_status=order_status,
                finish_time_ns=now,
                ledger_transaction_id=ledger_transaction_id or refund.ledger_transaction_id,
            )
            finished, payment = self._refund(refund_id), self._payment(refund.payment_id)
            response = pg.RefundPaymentResponse(
                refund=refund_message(finished), payment=payment_message(payment)
            )
            self._db.complete(tx, REFUND_METHOD, refund.idempotency_key, response)
            self.outbox.add(tx, refund_id, refund_events(finished, payment))
            self.leases.release(refund_lease(refund_id), tx=tx)
            return response

    def refund(self, refund_id: str) -> RefundRecord:
        """The refund row; NotFound if there is none."""
        return self._refund(refund_id)

    def refunds_of(self, payment_id: str) -> list[RefundRecord]:
        """A payment's refunds, oldest first."""
        rows = self._db.all(
            "SELECT * FROM refunds WHERE payment_id = ? ORDER BY create_time_ns, refund_id",
            (payment_id,),
        )
        return [_refund_record(row) for row in rows]

    def unfinished_refunds(self) -> list[str]:
        """Ids of refunds whose flow has not reached a terminal status, oldest first."""
        rows = self._db.all(
            "SELECT refund_id FROM refunds WHERE step != ? ORDER BY create_time_ns",
            (RefundStep.FINISHED,),
        )
        return [row["refund_id"] for row in rows]

    # --- rows -------------------------------------------------------------------------------

    def _adopt_legacy(self) -> None:
        """Move the unsent effects of a database written before the outbox into the outbox.

        Such a database marks them with ``effects_pending``; their outbox rows get today's
        event ids, so a destination that had taken some of them under the old ids may see
        those once more.
        """
        for table, key, record_of in (
            ("payments", "payment_id", _payment_record),
            ("refunds", "refund_id", _refund_record),
        ):
            if _LEGACY_EFFECTS_COLUMN not in self._db.columns(table):
                continue
            with self._db.transaction() as tx:
                for row in tx.all(
                    f"SELECT * FROM {table} WHERE {_LEGACY_EFFECTS_COLUMN} = 1 AND step = ?",
                    (Step.FINISHED,),
                ):
                    record = record_of(row)
                    if isinstance(record, PaymentRecord):
                        # The flow of that version marked the order PAID itself.
                        events = payment_events(record, order_paid=False)
                    else:
                        events = refund_events(record, self._payment(record.payment_id))
                    self.outbox.add(tx, row[key], events)
                tx.run(
                    f"UPDATE {table} SET {_LEGACY_EFFECTS_COLUMN} = 0"
                    f" WHERE {_LEGACY_EFFECTS_COLUMN} = 1 AND step = ?",
                    (Step.FINISHED,),
                )

    def _update(
        self,
        table: str,
        columns: frozenset[str],
        key_column: str,
        key: str,
        *,
        tx: Statements | None = None,
        **fields: Any,
    ) -> None:
        unknown = set(fields) - columns
        if unknown:
            raise ValueError(f"not columns of {table}: {sorted(unknown)}")
        fields.setdefault("update_time_ns", self._db.clock_ns())
        (tx or self._db).update(table, fields, **{key_column: key})

    def _payment(self, payment_id: str, *, merchant_id: str = "") -> PaymentRecord:
        row = self._db.one("SELECT * FROM payments WHERE payment_id = ?", (payment_id,))
        if row is None or (merchant_id and row["merchant_id"] != merchant_id):
            raise NotFound(
                f"payment {payment_id!r} does not exist",
                reason=Reason.PAYMENT_NOT_FOUND,
                metadata={"payment_id": payment_id},
            )
        return _payment_record(row)

    def _refund(self, refund_id: str) -> RefundRecord:
        row = self._db.one("SELECT * FROM refunds WHERE refund_id = ?", (refund_id,))
        if row is None:
            raise NotFound(
                f"refund {refund_id!r} does not exist", metadata={"refund_id": refund_id}
            )
        return _refund_record(row)
