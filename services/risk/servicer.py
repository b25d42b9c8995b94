"""risk-service RPCs: assess a payment (geo-IP, amount, velocity, country), read results.

A replay of AssessPayment returns the stored assessment without asking the partner again.
When the geo-IP partner is down the payment is still assessed, without geography, and the
assessment says so (reason GEO_LOOKUP_UNAVAILABLE): risk failing must not stop payments.
"""

from __future__ import annotations

from paymesh.risk.v1 import risk_pb2 as pb
from paymesh.risk.v1 import risk_pb2_grpc as pb_grpc
from services.mesh import validation as v
from services.mesh.bootstrap import Context
from services.risk.geo import GeoLookup
from services.risk.store import AssessmentStore


class RiskServicer(pb_grpc.RiskServiceServicer):
    """Assesses payments and summarises merchants' assessments."""

    def __init__(self, store: AssessmentStore, geo: GeoLookup) -> None:
        self._store = store
        self._geo = geo

    async def AssessPayment(
        self, request: pb.AssessPaymentRequest, context: Context
    ) -> pb.AssessPaymentResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        v.require_id("payment_id", request.payment_id)
        v.require_amount("amount", request.amount)
        v.optional_ip("customer_ip", request.customer_ip)
        v.optional_country_code("customer_country_code", request.customer_country_code)
        stored = self._store.replay(request)
        if stored is not None:
            return pb.AssessPaymentResponse(assessment=stored)
        geo = await self._geo.lookup(request.customer_ip) if request.customer_ip else None
        return pb.AssessPaymentResponse(assessment=self._store.assess(request, geo))

    async def GetAssessment(
        self, request: pb.GetAssessmentRequest, context: Context
    ) -> pb.GetAssessmentResponse:
        v.require_id("assessment_id", request.assessment_id)
        return pb.GetAssessmentResponse(assessment=self._store.get(request.assessment_id))

    async def GetRiskSummary(
        self, request: pb.GetRiskSummaryRequest, context: Context
    ) -> pb.GetRiskSummaryResponse:
        v.require_id("merchant_id", request.merchant_id)
        return pb.GetRiskSummaryResponse(summary=self._store.summary(request.merchant_id))
