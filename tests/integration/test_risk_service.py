"""risk-service through real gRPC on loopback against the partner sandbox's geo-IP.

203.0.113.x is a high-risk country in the sandbox and 198.51.100.x a proxy; other
addresses resolve to an ordinary country.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from paymesh.common.v1 import common_pb2
from paymesh.risk.v1 import risk_pb2 as pb
from paymesh.risk.v1 import risk_pb2_grpc as pb_grpc
from services.mesh.admin_token import (
    FAULT_INJECTION_VAR,
    ControlAccess,
    admin_authorization,
    with_admin_token,
)
from services.risk.__main__ import build
from services.tools.sandbox.app import SandboxState
from tests.servers import ServicesUnderTest, running_sandbox

ORDINARY_IP = "192.0.2.10"


@dataclass
class Risk:
    stub: pb_grpc.RiskServiceAsyncStub
    sandbox: str
    state: SandboxState
    control: dict[str, str]
    """Headers that open the sandbox's fault switches."""


@pytest.fixture
async def risk(tmp_path: Path, services: ServicesUnderTest) -> AsyncIterator[Risk]:
    control = with_admin_token({FAULT_INJECTION_VAR: "1"}, tmp_path)
    with running_sandbox(ControlAccess.from_environ(control)) as (sandbox, state):
        stub = await services.serve(
            "risk-service",
            build,
            pb_grpc.RiskServiceStub,
            environ={"PARTNER_SANDBOX_ADDR": sandbox},
        )
        yield Risk(stub, sandbox, state, admin_authorization(control))


def _assess(
    request_id: str = "r1",
    *,
    amount: int = 1000,
    currency: str = "USD",
    ip: str = ORDINARY_IP,
    country: str = "",
    merchant: str = "m_1",
) -> pb.AssessPaymentRequest:
    return pb.AssessPaymentRequest(
        request_id=request_id,
        merchant_id=merchant,
        payment_id=f"pay_{request_id}",
        amount=common_pb2.Money(amount_minor=amount, currency_code=currency),
        customer_ip=ip,
        customer_country_code=country,
    )


def _codes(assessment: pb.RiskAssessment) -> list[str]:
    return [reason.code for reason in assessment.reasons]


async def _geo_down(risk: Risk) -> None:
    body = json.dumps({"partner": "geo-ip", "error_rate": 1.0}).encode()
    request = urllib.request.Request(
        f"http://{risk.sandbox}/_control/faults", data=body, method="POST", headers=risk.control
    )
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=5).close())


async def test_ordinary_payment_is_approved_with_geo(risk: Risk) -> None:
    assessment = (await risk.stub.AssessPayment(_assess())).assessment
    assert assessment.decision == pb.RISK_DECISION_APPROVE
    assert assessment.score == 0
    assert assessment.geo.lookup_succeeded
    assert len(assessment.geo.ip_country_code) == 2


async def test_high_risk_country_is_declined(risk: Risk) -> None:
    assessment = (await risk.stub.AssessPayment(_assess(ip="203.0.113.7"))).assessment
    assert assessment.decision == pb.RISK_DECISION_DECLINE
    assert "HIGH_RISK_COUNTRY" in _codes(assessment)


async def test_proxy_is_reviewed(risk: Risk) -> None:
    assessment = (await risk.stub.AssessPayment(_assess(ip="198.51.100.4"))).assessment
    assert assessment.decision == pb.RISK_DECISION_REVIEW
    assert assessment.geo.is_proxy
    assert "PROXY" in _codes(assessment)


async def test_declared_country_unlike_the_ip_raises_the_score(risk: Risk) -> None:
    first = (await risk.stub.AssessPayment(_assess("r1"))).assessment
    other = "ZZ" if first.geo.ip_country_code != "ZZ" else "YY"
    second = (await risk.stub.AssessPayment(_assess("r2", country=other))).assessment
    assert second.geo.country_mismatch
    assert "COUNTRY_MISMATCH" in _codes(second)
    assert second.score > first.score


async def test_large_amount_is_reviewed_and_huge_amount_declined(risk: Risk) -> None:
    large = (await risk.stub.AssessPayment(_assess("r1", amount=600_000))).assessment
    huge = await risk.stub.AssessPayment(_assess("r2", amount=6_000_000, merchant="m_2"))
    assert (large.decision, _codes(large)[0]) == (pb.RISK_DECISION_REVIEW, "AMOUNT_HIGH")
    assert huge.assessment.decision == pb.RISK_DECISION_DECLINE
    assert "AMOUNT_LIMIT_EXCEEDED" in _codes(huge.assessment)


async def test_amount_limits_depend_on_the_currency(risk: Risk) -> None:
    # 600,000 minor units are 6,000 USD (above review) but only 600,000 JPY (below).
    yen = (await risk.stub.AssessPayment(_assess(amount=600_000, currency="JPY"))).assessment
    assert yen.decision == pb.RISK_DECISION_APPROVE


async def test_many_payments_in_the_window_are_reviewed(risk: Risk) -> None:
    for index in range(30):
        await risk.stub.AssessPayment(_assess(f"r{index}"))
    assessment = (await risk.stub.AssessPayment(_assess("r30"))).assessment
    assert assessment.decision == pb.RISK_DECISION_REVIEW
    assert "VELOCITY" in _codes(assessment)


async def test_replay_returns_the_stored_assessment_without_a_lookup(risk: Risk) -> None:
    first = await risk.stub.AssessPayment(_assess())
    again = await risk.stub.AssessPayment(_assess())
    assert again == first
    assert risk.state.requests["geo-ip"] == 1


async def test_request_id_reused_with_another_body_is_invalid_argument(risk: Risk) -> None:
    await risk.stub.AssessPayment(_assess())
    with pytest.raises(aio.AioRpcError) as caught:
        await risk.stub.AssessPayment(_assess(amount=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_geo_outage_assesses_without_geography(risk: Risk) -> None:
    await _geo_down(risk)
    assessment = (await risk.stub.AssessPayment(_assess())).assessment
    assert assessment.decision == pb.RISK_DECISION_APPROVE
    assert not assessment.geo.lookup_succeeded
    assert _codes(assessment) == ["GEO_LOOKUP_UNAVAILABLE"]


async def test_geo_answers_are_cached_per_address(risk: Risk) -> None:
    await risk.stub.AssessPayment(_assess("r1"))
    await risk.stub.AssessPayment(_assess("r2"))
    assert risk.state.requests["geo-ip"] == 1


async def test_summary_counts_decisions_per_merchant(risk: Risk) -> None:
    await risk.stub.AssessPayment(_assess("r1"))
    await risk.stub.AssessPayment(_assess("r2", ip="198.51.100.4"))
    await risk.stub.AssessPayment(_assess("r3", ip="203.0.113.7"))
    await risk.stub.AssessPayment(_assess("r4", merchant="m_2"))
    summary = await risk.stub.GetRiskSummary(pb.GetRiskSummaryRequest(merchant_id="m_1"))
    got = summary.summary
    assert (got.assessment_count, got.approve_count, got.review_count, got.decline_count) == (
        3,
        1,
        1,
        1,
    )
    assert 0 < got.average_score <= 100
    assert got.HasField("last_assessment_time")


async def test_summary_of_a_merchant_without_assessments_is_zero(risk: Risk) -> None:
    summary = await risk.stub.GetRiskSummary(pb.GetRiskSummaryRequest(merchant_id="m_9"))
    assert summary.summary.assessment_count == 0
    assert not summary.summary.HasField("last_assessment_time")


async def test_stored_assessment_is_readable(risk: Risk) -> None:
    made = (await risk.stub.AssessPayment(_assess())).assessment
    got = await risk.stub.GetAssessment(pb.GetAssessmentRequest(assessment_id=made.assessment_id))
    assert got.assessment == made


async def test_an_answer_with_reasons_and_without_geography_reads_back_the_same(
    risk: Risk,
) -> None:
    flagged = (
        await risk.stub.AssessPayment(_assess("r1", country="FR", amount=600_000))
    ).assessment
    await _geo_down(risk)
    blind = (await risk.stub.AssessPayment(_assess("r2", ip="198.51.100.9"))).assessment
    for made in (flagged, blind):
        assert made.reasons
        got = await risk.stub.GetAssessment(
            pb.GetAssessmentRequest(assessment_id=made.assessment_id)
        )
        assert got.assessment == made


@pytest.mark.parametrize(
    "request_",
    [
        _assess(ip="not-an-ip"),
        _assess(country="germany"),
        _assess(amount=0),
        _assess(currency="XXX"),
        _assess(request_id=""),
    ],
)
async def test_bad_assessment_request_is_invalid_argument(
    risk: Risk, request_: pb.AssessPaymentRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await risk.stub.AssessPayment(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_assessment_is_not_found(risk: Risk) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await risk.stub.GetAssessment(pb.GetAssessmentRequest(assessment_id="ra_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
