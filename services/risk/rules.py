"""The risk rules, as pure functions of a payment, its geo-IP answer and recent history.

Each rule that fires adds points and may force a decision; the decision is the strictest of
the forced ones and of the score bands. Amount limits are in major units per currency and
compared in minor units, so 50,000 JPY and 50,000 USD are not the same amount.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from paymesh.risk.v1 import risk_pb2 as pb
from services.mesh.validation import CURRENCY_EXPONENT

#: Decisions as plain ints, ordered by strictness so the strictest is the ``max``.
APPROVE: int = pb.RISK_DECISION_APPROVE
REVIEW: int = pb.RISK_DECISION_REVIEW
DECLINE: int = pb.RISK_DECISION_DECLINE

#: (review above, decline above) in major units, roughly equal in value across currencies.
AMOUNT_LIMITS_MAJOR: Mapping[str, tuple[int, int]] = {
    "USD": (5_000, 50_000),
    "EUR": (5_000, 50_000),
    "GBP": (4_000, 40_000),
    "CHF": (4_500, 45_000),
    "CAD": (7_000, 70_000),
    "AUD": (7_500, 75_000),
    "SGD": (6_500, 65_000),
    "CNY": (35_000, 350_000),
    "HKD": (40_000, 400_000),
    "JPY": (750_000, 7_500_000),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskRules:
    """Thresholds of the rules; defaults are the platform's policy."""

    amount_limits_major: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: dict(AMOUNT_LIMITS_MAJOR)
    )
    """Per currency: above the first a payment is reviewed, above the second declined."""
    velocity_window_s: float = 60.0
    """Sliding window over which a merchant's recent assessments are counted."""
    velocity_max_count: int = 30
    """More assessments than this in the window flags a payment for review."""
    velocity_max_amount_factor: int = 5
    """More than this many review limits of volume in the window flags it for review."""
    review_score: int = 50
    """A score at or above this is at least REVIEW."""
    decline_score: int = 80
    """A score at or above this is DECLINE."""

    def __post_init__(self) -> None:
        if not 0 < self.review_score <= self.decline_score <= 100:
            raise ValueError("need 0 < review_score <= decline_score <= 100")
        if self.velocity_window_s <= 0 or self.velocity_max_count < 1:
            raise ValueError("velocity window and count must be positive")
        for currency, (review, decline) in self.amount_limits_major.items():
            if currency not in CURRENCY_EXPONENT or not 0 < review <= decline:
                raise ValueError(f"amount limits of {currency}: need 0 < review <= decline")

    def limits_minor(self, currency: str) -> tuple[int, int]:
        """The (review, decline) limits of ``currency`` in its minor units."""
        review, decline = self.amount_limits_major.get(currency, AMOUNT_LIMITS_MAJOR["USD"])
        scale = 10 ** CURRENCY_EXPONENT[currency]
        return review * scale, decline * scale


@dataclass(frozen=True, slots=True)
class Geo:
    """The geo-IP partner's answer, or its absence."""

    looked_up: bool
    """Whether the partner answered."""
    country: str = ""
    """ISO 3166-1 alpha-2 country of the address."""
    proxy: bool = False
    """Flagged as proxy, VPN or hosting."""
    high_risk: bool = False
    """The country is on the partner's high-risk list."""
    city: str = ""
    """City, if the partner knows it."""


@dataclass(frozen=True, slots=True)
class Velocity:
    """A merchant's assessments inside the window, before this one."""

    count: int
    """How many."""
    amount_minor: int
    """Their total in the payment's currency."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of the rules."""

    decision: int
    """RiskDecision."""
    score: int
    """0-100."""
    reasons: tuple[pb.RiskReason, ...]
    """Rules that fired, in order."""
    country_mismatch: bool
    """The declared country differs from the IP's."""


def assess(
    *,
    amount_minor: int,
    currency: str,
    customer_country: str,
    geo: Geo | None,
    velocity: Velocity,
    rules: RiskRules,
) -> Verdict:
    """Apply every rule; ``geo`` is None when no IP was given (nothing to look up)."""
    reasons: list[pb.RiskReason] = []
    forced = APPROVE

    def fire(code: str, description: str, points: int, floor: int = APPROVE) -> None:
        nonlocal forced
        reasons.append(pb.RiskReason(code=code, description=description, score_delta=points))
        forced = max(forced, floor)

    review_limit, decline_limit = rules.limits_minor(currency)
    if amount_minor > decline_limit:
        fire(
            "AMOUNT_LIMIT_EXCEEDED",
            f"{amount_minor} {currency} minor units exceed the limit of {decline_limit}",
            60,
            DECLINE,
        )
    elif amount_minor > review_limit:
        fire(
            "AMOUNT_HIGH",
            f"{amount_minor} {currency} minor units exceed the review limit of {review_limit}",
            30,
            REVIEW,
        )

    if velocity.count >= rules.velocity_max_count:
        fire(
            "VELOCITY",
            f"{velocity.count} payments of the merchant in the last {rules.velocity_window_s:g} s",
            25,
            REVIEW,
        )
    volume_limit = review_limit * rules.velocity_max_amount_factor
    # Volume needs history: one large payment alone is the amount rule's business.
    if velocity.count and velocity.amount_minor + amount_minor > volume_limit:
        fire(
            "VELOCITY_AMOUNT",
            f"{velocity.amount_minor + amount_minor} {currency} minor units in the last"
            f" {rules.velocity_window_s:g} s exceed {volume_limit}",
            25,
            REVIEW,
        )

    mismatch = False
    if geo is not None and not geo.looked_up:
        # Fail open: an outage of the geo partner must not stop payments; the other rules
        # still apply and the reason records that geography was not checked.
        fire("GEO_LOOKUP_UNAVAILABLE", "the geo-IP partner did not answer; geography unchecked", 10)
    elif geo is not None:
        if geo.high_risk:
            fire(
                "HIGH_RISK_COUNTRY",
                f"the IP address is in high-risk country {geo.country}",
                80,
                DECLINE,
            )
        if geo.proxy:
            fire("PROXY", "the IP address is a proxy, VPN or hosting provider", 30, REVIEW)
        if customer_country and geo.country and customer_country != geo.country:
            mismatch = True
            fire(
                "COUNTRY_MISMATCH",
                f"declared country {customer_country} differs from IP country {geo.country}",
                20,
            )

    score = min(100, sum(r.score_delta for r in reasons))
    banded = (
        DECLINE
        if score >= rules.decline_score
        else REVIEW
        if score >= rules.review_score
        else APPROVE
    )
    return Verdict(max(forced, banded), score, tuple(reasons), mismatch)
