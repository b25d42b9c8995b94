"""Exchange-rate logic of channel-adapter: exact conversion and the TTL cache, fake clock."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.channel_adapter.config import AdapterConfig
from services.channel_adapter.rates import Quote, RateCache, convert, parse_rate
from services.mesh.bootstrap import StartupError


@pytest.mark.parametrize(
    ("amount", "source", "target", "rate", "expected"),
    [
        (1000, "USD", "EUR", "0.92", 920),
        (1, "USD", "EUR", "0.925", 1),  # 0.925 cents: rounds to nearest
        (5, "USD", "EUR", "0.9", 4),  # 4.5 cents: half to even rounds down
        (7, "USD", "EUR", "0.5", 4),  # 3.5 cents: half to even rounds up
        (1234, "JPY", "USD", "0.006609", 816),  # exponent 0 to 2
        (100, "USD", "JPY", "151.30", 151),  # exponent 2 to 0
    ],
)
def test_convert_rescales_exponents_and_rounds_half_even(
    amount: int, source: str, target: str, rate: str, expected: int
) -> None:
    assert convert(amount, source, target, Decimal(rate)) == expected


@pytest.mark.parametrize("text", ["0", "-1", "NaN", "Infinity", "abc", 0.92, None])
def test_parse_rate_refuses_what_is_not_a_positive_decimal_string(text: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_cache_serves_within_ttl_and_refetches_after() -> None:
    fetched: list[tuple[str, str]] = []

    async def fetch(source: str, target: str) -> Quote:
        fetched.append((source, target))
        return Quote(source, target, Decimal("0.9"), 0.0)

    clock = _Clock()
    cache = RateCache(fetch, ttl_s=60, clock=clock)
    assert (await cache.get("USD", "EUR"))[1] is False
    clock.now = 59.9
    assert (await cache.get("USD", "EUR"))[1] is True
    clock.now = 60.0
    assert (await cache.get("USD", "EUR"))[1] is False
    assert fetched == [("USD", "EUR"), ("USD", "EUR")]


def test_rate_ttl_comes_from_the_environment() -> None:
    assert AdapterConfig.from_environ({"CHANNEL_ADAPTER_RATE_TTL_S": "5"}).rate_ttl_s == 5.0
    assert AdapterConfig.from_environ({}).rate_ttl_s == 60.0


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_rate_ttl_stops_start_up_naming_the_variable(raw: str) -> None:
    with pytest.raises(StartupError, match="CHANNEL_ADAPTER_RATE_TTL_S"):
        AdapterConfig.from_environ({"CHANNEL_ADAPTER_RATE_TTL_S": raw})
