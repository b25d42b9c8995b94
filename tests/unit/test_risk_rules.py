"""The risk rules as pure functions: amount bands per currency, velocity, geography."""

from __future__ import annotations

import pytest

from paymesh.risk.v1 import risk_pb2 as pb
from services.risk.rules import Geo, RiskRules, Velocity, Verdict, assess

RULES = RiskRules()
QUIET = Velocity(count=0, amount_minor=0)
HOME = Geo(looked_up=True, country="DE")


def _assess(
    amount: int = 1000,
    currency: str = "EUR",
    *,
    country: str = "DE",
    geo: Geo | None = HOME,
    velocity: Velocity = QUIET,
) -> Verdict:
    return assess(
        amount_minor=amount,
        currency=currency,
        customer_country=country,
        geo=geo,
        velocity=velocity,
        rules=RULES,
    )


def test_ordinary_payment_scores_zero_and_is_approved() -> None:
    verdict = _assess()
    assert (verdict.decision, verdict.score, verdict.reasons) == (pb.RISK_DECISION_APPROVE, 0, ())


@pytest.mark.parametrize(
    ("amount", "currency", "decision"),
    [
        (500_000, "EUR", pb.RISK_DECISION_APPROVE),  # exactly the review limit
        (500_001, "EUR", pb.RISK_DECISION_REVIEW),
        (5_000_001, "EUR", pb.RISK_DECISION_DECLINE),
        (600_000, "EUR", pb.RISK_DECISION_REVIEW),
        (600_000, "JPY", pb.RISK_DECISION_APPROVE),  # JPY has no minor unit
        (750_001, "JPY", pb.RISK_DECISION_REVIEW),
    ],
)
def test_amount_bands_are_per_currency_in_minor_units(
    amount: int, currency: str, decision: int
) -> None:
    assert _assess(amount, currency).decision == decision


def test_high_risk_country_declines_whatever_the_amount() -> None:
    verdict = _assess(geo=Geo(looked_up=True, country="KP", high_risk=True), country="KP")
    assert verdict.decision == pb.RISK_DECISION_DECLINE


def test_country_mismatch_only_adds_score() -> None:
    verdict = _assess(country="FR")
    assert (verdict.decision, verdict.score, verdict.country_mismatch) == (
        pb.RISK_DECISION_APPROVE,
        20,
        True,
    )


def test_mismatch_with_a_high_amount_is_still_review_not_decline() -> None:
    verdict = _assess(500_001, country="FR")
    assert (verdict.decision, verdict.score) == (pb.RISK_DECISION_REVIEW, 50)


def test_proxy_and_high_amount_and_mismatch_add_up_to_decline() -> None:
    geo = Geo(looked_up=True, country="DE", proxy=True)
    verdict = _assess(500_001, geo=geo, country="FR")
    assert (verdict.decision, verdict.score) == (pb.RISK_DECISION_DECLINE, 80)


def test_geo_outage_is_noted_and_does_not_decline() -> None:
    verdict = _assess(geo=Geo(looked_up=False))
    assert verdict.decision == pb.RISK_DECISION_APPROVE
    assert [r.code for r in verdict.reasons] == ["GEO_LOOKUP_UNAVAILABLE"]


def test_no_ip_means_no_geography_rules() -> None:
    assert _assess(geo=None, country="FR").reasons == ()


def test_velocity_by_count_and_by_volume_reviews() -> None:
    by_count = _assess(velocity=Velocity(count=30, amount_minor=0))
    by_volume = _assess(velocity=Velocity(count=1, amount_minor=2_500_000))
    assert [r.code for r in by_count.reasons] == ["VELOCITY"]
    assert [r.code for r in by_volume.reasons] == ["VELOCITY_AMOUNT"]
    assert by_count.decision == by_volume.decision == pb.RISK_DECISION_REVIEW


def test_score_never_exceeds_one_hundred() -> None:
    geo = Geo(looked_up=True, country="KP", proxy=True, high_risk=True)
    verdict = _assess(5_000_001, geo=geo, country="FR", velocity=Velocity(99, 10**10))
    assert verdict.score == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"review_score": 90, "decline_score": 80},
        {"velocity_window_s": 0},
        {"amount_limits_major": {"EUR": (10, 5)}},
        {"amount_limits_major": {"XXX": (1, 2)}},
    ],
)
def test_inconsistent_rules_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RiskRules(**kwargs)  # type: ignore[arg-type]
