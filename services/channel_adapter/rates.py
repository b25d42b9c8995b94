"""Exchange rates: conversion in exact decimal arithmetic and a TTL cache (in-process, and
shared by the replicas in Redis when ``REDIS_URL`` is set).

A rate is target major units per source major unit; amounts are minor units, so a
conversion rescales by both currencies' exponents and rounds half to even once, at the end.
"""

from __future__ import annotations

import asyncio
import decimal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from services.mesh.validation import CURRENCY_EXPONENT
from services.storage.shared_state import SharedCache

#: Enough digits for any amount below 10**12 minor units times any plausible rate.
_PRECISION = 50


@dataclass(frozen=True, slots=True)
class Quote:
    """One published rate."""

    source: str
    """ISO 4217 code converted from."""
    target: str
    """ISO 4217 code converted to."""
    rate: Decimal
    """Target major units per one source major unit."""
    as_of_s: float
    """When the partner published it (Unix seconds)."""


def parse_rate(text: object) -> Decimal:
    """A rate from the partner's decimal string; ValueError unless finite and positive."""
    if not isinstance(text, str):
        raise ValueError(f"rate must be a decimal string, got {text!r}")
    try:
        rate = Decimal(text)
    except decimal.InvalidOperation as exc:
        raise ValueError(f"rate {text!r} is not a decimal number") from exc
    if not rate.is_finite() or rate <= 0:
        raise ValueError(f"rate {text!r} is not a positive finite number")
    return rate


def convert(amount_minor: int, source: str, target: str, rate: Decimal) -> int:
    """``amount_minor`` of ``source`` in minor units of ``target`` (ROUND_HALF_EVEN)."""
    with decimal.localcontext() as context:
        context.prec = _PRECISION
        major = Decimal(amount_minor).scaleb(-CURRENCY_EXPONENT[source])
        converted = (major * rate).scaleb(CURRENCY_EXPONENT[target])
        return int(converted.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


Fetch = Callable[[str, str], Awaitable[Quote]]


class RateCache:
    """Quotes per currency pair, kept ``ttl_s`` seconds; one fetch per pair at a time.

    With ``shared``, a pair this process does not hold is looked for in Redis before the
    partner is asked, and a fetched quote is put there for the other replicas (for what is
    left of its TTL); Redis being down only means asking the partner.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCache | None = None,
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must not be negative, got {ttl_s}")
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._shared = shared
        self._quotes: dict[tuple[str, str], tuple[Quote, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _fresh(self, pair: tuple[str, str]) -> Quote | None:
        cached = self._quotes.get(pair)
        if cached is not None and self._clock() < cached[1]:
            return cached[0]
        return None

    async def get(self, source: str, target: str) -> tuple[Quote, bool]:
        """The quote for the pair and whether it came from the cache."""
        pair = (source, target)
        quote = self._fresh(pair)
        if quote is not None:
            return quote, True
        lock = self._locks.setdefault(pair, asyncio.Lock())
        async with lock:
            # Another caller may have fetched it while this one waited for the lock.
            quote = self._fresh(pair)
            if quote is not None:
                return quote, True
            if self._shared is not None:
                quote = await self._shared_quote(self._shared, pair)
                if quote is not None:
                    return quote, True
            quote = await self._fetch(source, target)
            self._quotes[pair] = (quote, self._clock() + self._ttl_s)
            if self._shared is not None:
                await self._shared.put(f"{source}:{target}", _record(quote), ttl_s=self._ttl_s)
            return quote, False

    async def _shared_quote(self, shared: SharedCache, pair: tuple[str, str]) -> Quote | None:
        found = await shared.get(f"{pair[0]}:{pair[1]}")
        if found is None:
            return None
        record, left_s = found
        try:
            quote = Quote(
                source=pair[0],
                target=pair[1],
                rate=parse_rate(record.get("rate")),
                as_of_s=float(record["as_of_s"]),
            )
        except (KeyError, TypeError, ValueError):
            return None  # not what this code writes: ask the partner
        self._quotes[pair] = (quote, self._clock() + left_s)
        return quote


def _record(quote: Quote) -> dict[str, object]:
    # The rate as its decimal string: exact, as the partner published it.
    return {"rate": str(quote.rate), "as_of_s": quote.as_of_s}
