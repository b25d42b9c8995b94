"""merchant-auth's memory of merchant-service's answers: the authentication cache and its bounds.

A cached lookup answers from an answer younger than ``cache_s`` (never longer than ``stale_s``),
asks again after it, and a lookup that does not allow the cache always asks; at most
MAX_REMEMBERED merchants are remembered. Time is a fake clock.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from interceptors.errors import CallError
from paymesh.merchant.v1 import merchant_pb2
from services.merchant_auth import merchants as directory_module
from services.merchant_auth.config import CACHE_VAR, DEFAULT_CACHE_S, AuthConfig
from services.merchant_auth.merchants import MerchantDirectory
from services.mesh.bootstrap import StartupError
from tests.unit.fakes import FakeClock

ACTIVE = merchant_pb2.MERCHANT_STATUS_ACTIVE
SUSPENDED = merchant_pb2.MERCHANT_STATUS_SUSPENDED


class FakeMerchantService:
    """GetMerchant answering from ``status``; counts the calls; ``down`` makes it UNAVAILABLE."""

    def __init__(self) -> None:
        self.status: dict[str, merchant_pb2.MerchantStatus.ValueType] = {}
        self.calls = 0
        self.down = False

    async def GetMerchant(self, request: merchant_pb2.GetMerchantRequest, **_: Any) -> Any:
        self.calls += 1
        if self.down:
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                "down",
                target="merchant-service",
                method="m",
                attempts=1,
                stop_reason="attempts_exhausted",
            )
        merchant_id = request.merchant_id
        return merchant_pb2.GetMerchantResponse(
            merchant=merchant_pb2.Merchant(merchant_id=merchant_id, status=self.status[merchant_id])
        )


def _directory(
    service: FakeMerchantService, clock: FakeClock, *, cache_s: float = 1.0, stale_s: float = 30.0
) -> MerchantDirectory:
    return MerchantDirectory(service, stale_s=stale_s, cache_s=cache_s, clock=clock)  # type: ignore[arg-type]


async def test_a_cached_lookup_answers_from_memory_until_cache_s_then_asks_again() -> None:
    service, clock = FakeMerchantService(), FakeClock()
    service.status["m1"] = ACTIVE
    directory = _directory(service, clock, cache_s=1.0)
    assert (await directory.lookup("m1", allow_stale=True, allow_cached=True)).status == ACTIVE
    service.status["m1"] = SUSPENDED
    clock.advance(0.9)
    assert (await directory.lookup("m1", allow_stale=True, allow_cached=True)).status == ACTIVE
    assert service.calls == 1
    clock.advance(0.1)  # the bound: a suspension is seen once cache_s has passed
    assert (await directory.lookup("m1", allow_stale=True, allow_cached=True)).status == SUSPENDED
    assert service.calls == 2


async def test_a_lookup_without_the_cache_always_asks() -> None:
    service, clock = FakeMerchantService(), FakeClock()
    service.status["m1"] = ACTIVE
    directory = _directory(service, clock)
    await directory.lookup("m1", allow_stale=True, allow_cached=True)
    service.status["m1"] = SUSPENDED
    assert (await directory.lookup("m1", allow_stale=False)).status == SUSPENDED
    assert service.calls == 2


async def test_no_cache_with_cache_s_zero() -> None:
    service, clock = FakeMerchantService(), FakeClock()
    service.status["m1"] = ACTIVE
    directory = _directory(service, clock, cache_s=0.0)
    for _ in range(3):
        await directory.lookup("m1", allow_stale=True, allow_cached=True)
    assert service.calls == 3


async def _looked_up_once(
    *, cache_s: float, stale_s: float
) -> tuple[FakeMerchantService, FakeClock, MerchantDirectory]:
    """A directory that has looked up the active merchant m1 once."""
    service, clock = FakeMerchantService(), FakeClock()
    service.status["m1"] = ACTIVE
    directory = _directory(service, clock, cache_s=cache_s, stale_s=stale_s)
    await directory.lookup("m1", allow_stale=True, allow_cached=True)
    return service, clock, directory


async def test_the_cache_never_outlives_the_stale_bound() -> None:
    service, clock, directory = await _looked_up_once(cache_s=60.0, stale_s=2.0)
    clock.advance(2.0)
    await directory.lookup("m1", allow_stale=True, allow_cached=True)
    assert service.calls == 2


async def test_an_outage_answers_from_memory_within_stale_s_only() -> None:
    service, clock, directory = await _looked_up_once(cache_s=1.0, stale_s=5.0)
    service.down = True
    clock.advance(4.0)
    assert (await directory.lookup("m1", allow_stale=True, allow_cached=True)).status == ACTIVE
    clock.advance(2.0)
    with pytest.raises(CallError):
        await directory.lookup("m1", allow_stale=True, allow_cached=True)


async def test_the_memory_is_bounded_and_forgets_the_least_recently_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(directory_module, "MAX_REMEMBERED", 2)
    service, clock = FakeMerchantService(), FakeClock()
    directory = _directory(service, clock, cache_s=10.0)
    for merchant_id in ("m1", "m2", "m3"):
        service.status[merchant_id] = ACTIVE
        await directory.lookup(merchant_id, allow_stale=True, allow_cached=True)
    assert service.calls == 3
    await directory.lookup("m3", allow_stale=True, allow_cached=True)  # remembered
    await directory.lookup("m1", allow_stale=True, allow_cached=True)  # forgotten: asks
    assert service.calls == 4


def test_the_cache_bound_is_configurable_and_checked() -> None:
    assert AuthConfig.from_environ({}).merchant_cache_s == DEFAULT_CACHE_S
    assert AuthConfig.from_environ({CACHE_VAR: "0.25"}).merchant_cache_s == 0.25
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(StartupError, match=CACHE_VAR):
            AuthConfig.from_environ({CACHE_VAR: bad})
