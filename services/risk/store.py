"""risk-service's data: one row per assessment, its reasons, and the idempotency keys.

The velocity rule reads the merchant's recent assessments in the same transaction that
stores the new one, so two payments cannot both miss each other.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.common.v1 import common_pb2
from paymesh.risk.v1 import risk_pb2 as pb
from services.mesh.errors import NotFound
from services.risk.rules import Geo, RiskRules, Velocity, assess
from services.storage import idempotency
from services.storage.database import open_database, transaction

SCHEMA = (
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
    create_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS assessments_by_merchant ON assessments (merchant_id, create_time);
"""
    + idempotency.SCHEMA
)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _assessment(row: sqlite3.Row) -> pb.RiskAssessment:
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
        create_time=_timestamp(row["create_time"]),
    )


class AssessmentStore:
    """Assessments in SQLite; each is stored once per request id."""

    def __init__(
        self,
        path: Path | str,
        *,
        rules: RiskRules | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = open_database(path, SCHEMA)
        self._rules = rules or RiskRules()
        self._clock = clock

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def replay(self, request: pb.AssessPaymentRequest) -> pb.RiskAssessment | None:
        """The stored assessment of an earlier identical request, without claiming the id.

        Raises:
            InvalidArgument: the id was used with a different body.
        """
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "AssessPayment", request.request_id, request)
            stored = idempotency.replayed(pb.AssessPaymentResponse, claim)
            if stored is None:
                # Claimed only to run the checks; the real claim comes with the write.
                idempotency.release(conn, "AssessPayment", request.request_id)
                return None
            return stored.assessment

    def assess(self, request: pb.AssessPaymentRequest, geo: Geo | None) -> pb.RiskAssessment:
        """Apply the rules with the merchant's recent history and store the assessment."""
        with transaction(self._conn) as conn:
            claim = idempotency.claim(conn, "AssessPayment", request.request_id, request)
            stored = idempotency.replayed(pb.AssessPaymentResponse, claim)
            if stored is not None:
                return stored.assessment
            idempotency.refuse_if_kept(conn, "assessments", "request_id", request.request_id)
            now = self._clock()
            count, total = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN currency_code = ? THEN amount_minor"
                " ELSE 0 END), 0) FROM assessments WHERE merchant_id = ? AND create_time > ?",
                (
                    request.amount.currency_code,
                    request.merchant_id,
                    now - self._rules.velocity_window_s,
                ),
            ).fetchone()
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
            conn.execute(
                "INSERT INTO assessments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    assessment_id,
                    request.request_id,
                    request.merchant_id,
                    request.payment_id,
                    request.amount.amount_minor,
                    request.amount.currency_code,
                    request.customer_ip,
                    request.customer_country_code,
                    verdict.decision,
                    verdict.score,
                    json.dumps(reasons),
                    json.dumps(geo_info),
                    now,
                ),
            )
            assessment = self.get(assessment_id)
            idempotency.complete(
                conn,
                "AssessPayment",
                request.request_id,
                pb.AssessPaymentResponse(assessment=assessment),
            )
            return assessment

    def get(self, assessment_id: str) -> pb.RiskAssessment:
        """The assessment; NotFound if there is none."""
        row = self._conn.execute(
            "SELECT * FROM assessments WHERE assessment_id = ?", (assessment_id,)
        ).fetchone()
        if row is None:
            raise NotFound(
                f"assessment {assessment_id!r} does not exist",
                metadata={"assessment_id": assessment_id},
            )
        return _assessment(row)

    def summary(self, merchant_id: str) -> pb.RiskSummary:
        """Counts per decision, mean score and last time for one merchant (zeros if none)."""
        row = self._conn.execute(
            "SELECT COUNT(*) AS n, COALESCE(SUM(score), 0) AS total, MAX(create_time) AS last,"
            " SUM(decision = ?) AS approve, SUM(decision = ?) AS review,"
            " SUM(decision = ?) AS decline FROM assessments WHERE merchant_id = ?",
            (
                pb.RISK_DECISION_APPROVE,
                pb.RISK_DECISION_REVIEW,
                pb.RISK_DECISION_DECLINE,
                merchant_id,
            ),
        ).fetchone()
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
            summary.last_assessment_time.CopyFrom(_timestamp(row["last"]))
        return summary
