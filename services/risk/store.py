"""risk-service's data: one row per assessment, its reasons, and the idempotency keys.

The velocity rule reads the merchant's recent assessments in the same transaction that
stores the new one, so two payments cannot both miss each other.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

from paymesh.common.v1 import common_pb2
from paymesh.risk.v1 import risk_pb2 as pb
from services.mesh.errors import NotFound
from services.risk.rules import Geo, RiskRules, Velocity, assess
from services.storage import idempotency
from services.storage.sql import Database, Row, Statements, seconds_to_ns, timestamp

#: Migration 1: the tables.
TABLES = (
    """
CREATE TABLE IF NOT EXISTS assessments (
    assessment_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency_code TEXT NOT NULL,
    customer_ip TEXT NOT NULL,
    customer_country_code TEXT NOT NULL,
    decision INTEGER NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 0 AND 100),
    reasons_json TEXT NOT NULL,
    geo_json TEXT NOT NULL,
    create_time_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS assessments_by_merchant ON assessments (merchant_id, create_time_ns);
"""
    + idempotency.SCHEMA
)
#: Migration 2: the velocity query reads the index alone (it holds every column the query
#: needs) instead of every row of the window; the index it replaces was its prefix.
VELOCITY_INDEX = """
CREATE INDEX IF NOT EXISTS assessments_velocity
    ON assessments (merchant_id, create_time_ns, currency_code, amount_minor);
DROP INDEX IF EXISTS assessments_by_merchant;
"""
#: The store's migrations, in order.
SCHEMA = (TABLES, VELOCITY_INDEX)
#: The merchant's assessments in the window, and their amount in the request's currency.
VELOCITY_QUERY = (
    "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN currency_code = ?"
    " THEN amount_minor ELSE 0 END), 0) AS total"
    " FROM assessments WHERE merchant_id = ? AND create_time_ns > ?"
)


def _assessment(row: Row) -> pb.RiskAssessment:
    return pb.RiskAssessment(
        assessment_id=row["assessment_id"],
        payment_id=row["payment_id"],
        merchant_id=row["merchant_id"],
        amount=common_pb2.Money(
            amount_minor=row["amount_minor"], currency_code=row["currency_code"]
        ),
        customer_ip=row["customer_ip"],
        customer_country_code=row["customer_country_code"],
        decision=row["decision"],
        score=row["score"],
        reasons=[pb.RiskReason(**reason) for reason in json.loads(row["reasons_json"])],
        geo=pb.GeoInfo(**json.loads(row["geo_json"])),
        create_time=timestamp(row["create_time_ns"]),
    )


class AssessmentStore:
    """Assessments, each stored once per request id.

    Args:
        clock: seconds since the epoch (tests pass their own); stored as nanoseconds.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        rules: RiskRules | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = Database(path, SCHEMA, clock_ns=lambda: seconds_to_ns(clock()))
        self._rules = rules or RiskRules()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def replay(self, request: pb.AssessPaymentRequest) -> pb.RiskAssessment | None:
        """The stored assessment of an earlier identical request, without claiming the id.

        Raises:
            InvalidArgument: the id was used with a different body.
        """
        stored = self._db.replay("AssessPayment", request, pb.AssessPaymentResponse)
        return None if stored is None else stored.assessment

    def assess(self, request: pb.AssessPaymentRequest, geo: Geo | None) -> pb.RiskAssessment:
        """Apply the rules with the merchant's recent history and store the assessment."""

        def run(tx: Statements) -> pb.AssessPaymentResponse:
            now = self._db.clock_ns()
            recent = tx.aggregate(
                VELOCITY_QUERY,
                (
                    request.amount.currency_code,
                    request.merchant_id,
                    now - seconds_to_ns(self._rules.velocity_window_s),
                ),
            )
            count, total = recent["n"], recent["total"]
            verdict = assess(
                amount_minor=request.amount.amount_minor,
                currency=request.amount.currency_code,
                customer_country=request.customer_country_code,
                geo=geo,
                velocity=Velocity(count=count, amount_minor=total),
                rules=self._rules,
            )
            geo_info = {
                "lookup_succeeded": bool(geo and geo.looked_up),
                "ip_country_code": geo.country if geo else "",
                "city": geo.city if geo else "",
                "is_proxy": bool(geo and geo.proxy),
                "country_mismatch": verdict.country_mismatch,
            }
            reasons = [
                {"code": r.code, "description": r.description, "score_delta": r.score_delta}
                for r in verdict.reasons
            ]
            assessment_id = f"ra_{uuid.uuid4().hex[:24]}"
            tx.insert(
                "assessments",
                {
                    "assessment_id": assessment_id,
                    "request_id": request.request_id,
                    "merchant_id": request.merchant_id,
                    "payment_id": request.payment_id,
                    "amount_minor": request.amount.amount_minor,
                    "currency_code": request.amount.currency_code,
                    "customer_ip": request.customer_ip,
                    "customer_country_code": request.customer_country_code,
                    "decision": verdict.decision,
                    "score": verdict.score,
                    "reasons_json": json.dumps(reasons),
                    "geo_json": json.dumps(geo_info),
                    "create_time_ns": now,
                },
            )
            # The row just written, from its values: reading it back would only cost time.
            assessment = pb.RiskAssessment(
                assessment_id=assessment_id,
                payment_id=request.payment_id,
                merchant_id=request.merchant_id,
                amount=common_pb2.Money(
                    amount_minor=request.amount.amount_minor,
                    currency_code=request.amount.currency_code,
                ),
                customer_ip=request.customer_ip,
                customer_country_code=request.customer_country_code,
                decision=pb.RiskDecision.ValueType(verdict.decision),
                score=verdict.score,
                reasons=[
                    pb.RiskReason(code=r.code, description=r.description, score_delta=r.score_delta)
                    for r in verdict.reasons
                ],
                geo=pb.GeoInfo(
                    lookup_succeeded=bool(geo and geo.looked_up),
                    ip_country_code=geo.country if geo else "",
                    city=geo.city if geo else "",
                    is_proxy=bool(geo and geo.proxy),
                    country_mismatch=verdict.country_mismatch,
                ),
                create_time=timestamp(now),
            )
            return pb.AssessPaymentResponse(assessment=assessment)

        return self._db.idempotent(
            "AssessPayment",
            request,
            pb.AssessPaymentResponse,
            run,
            kept_in=("assessments", "request_id"),
        ).assessment

    def get(self, assessment_id: str) -> pb.RiskAssessment:
        """The assessment; NotFound if there is none."""
        row = self._db.one("SELECT * FROM assessments WHERE assessment_id = ?", (assessment_id,))
        if row is None:
            raise NotFound(
                f"assessment {assessment_id!r} does not exist",
                metadata={"assessment_id": assessment_id},
            )
        return _assessment(row)

    def summary(self, merchant_id: str) -> pb.RiskSummary:
        """Counts per decision, mean score and last time for one merchant (zeros if none)."""
        row = self._db.aggregate(
            "SELECT COUNT(*) AS n, COALESCE(SUM(score), 0) AS total, MAX(create_time_ns) AS last,"
            " COUNT(*) FILTER (WHERE decision = ?) AS approve,"
            " COUNT(*) FILTER (WHERE decision = ?) AS review,"
            " COUNT(*) FILTER (WHERE decision = ?) AS decline"
            " FROM assessments WHERE merchant_id = ?",
            (
                pb.RISK_DECISION_APPROVE,
                pb.RISK_DECISION_REVIEW,
                pb.RISK_DECISION_DECLINE,
                merchant_id,
            ),
        )
        count = int(row["n"])
        summary = pb.RiskSummary(
            merchant_id=merchant_id,
            assessment_count=count,
            approve_count=int(row["approve"] or 0),
            review_count=int(row["review"] or 0),
            decline_count=int(row["decline"] or 0),
        )
        if count:
            mean = (Decimal(row["total"]) / count).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
            summary.average_score = int(mean)
            summary.last_assessment_time.CopyFrom(timestamp(row["last"]))
        return summary
