"""The hang-detection series of a real chain runtime: trips by rule, calls failed in flight,
calls refused at the limit in flight (counted by running the attempt loop), and the breaker
gauge of a half-open-ready breaker."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from interceptors.attempts import Call, run_call, run_call_sync
from interceptors.breaker import ConcurrencyLimited, Outcome
from interceptors.policy import PolicyConfig
from interceptors.runtime import ChainRuntime
from services.mesh.metrics import ServiceMetrics
from tests.unit.fakes import AsyncScripted, FakeClock, GaveUp, Scripted

EDGE = {"caller": "payment-gateway", "target": "order-service"}
CALL = Call(target="order-service", method="/pkg.S/Read", safe=True, attempt_name="a")


def _runtime(clock: FakeClock, **breaker: int) -> tuple[ChainRuntime, ServiceMetrics]:
    config = PolicyConfig.from_mapping({"defaults": {"breaker": breaker}})
    runtime = ChainRuntime(caller="payment-gateway", config=config, clock=clock)
    metrics = ServiceMetrics(service="payment-gateway")
    metrics.follow_chain(runtime.telemetry, runtime.breakers.states, ("order-service",))
    return runtime, metrics


def _value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def test_a_trip_is_counted_by_the_rule_that_opened_the_breaker() -> None:
    runtime, metrics = _runtime(FakeClock())
    breaker = runtime.breakers.get("order-service")
    for _ in range(5):
        breaker.record(breaker.admit(), Outcome.FAILURE)

    rule = {**EDGE, "rule": "consecutive_failures"}
    assert _value(metrics, "paymesh_breaker_trips_total", **rule) == 1


async def test_calls_failed_in_flight_when_it_opened_are_counted() -> None:
    runtime, metrics = _runtime(FakeClock())
    hung = [asyncio.create_task(run_call(AsyncScripted("HANG"), CALL, runtime)) for _ in range(3)]
    await asyncio.sleep(0)  # all three in flight
    breaker = runtime.breakers.get("order-service")
    for _ in range(5):
        breaker.record(breaker.admit(), Outcome.FAILURE)
    results = await asyncio.gather(*hung, return_exceptions=True)

    assert [getattr(r, "what", r) for r in results] == ["aborted"] * 3
    assert _value(metrics, "paymesh_breaker_aborted_calls_total", **EDGE) == 3


def test_calls_refused_at_the_limit_in_flight_are_exported() -> None:
    runtime, metrics = _runtime(FakeClock(), max_concurrent_calls=1)
    breaker = runtime.breakers.get("order-service")
    breaker.admit()  # the one call in flight
    with pytest.raises(GaveUp):
        run_call_sync(Scripted("OK"), CALL, runtime)
    with pytest.raises(ConcurrencyLimited):
        breaker.admit()

    assert _value(metrics, "paymesh_client_concurrency_limited_total", **EDGE) == 1


def test_a_half_open_ready_breaker_reads_one_like_half_open() -> None:
    clock = FakeClock()
    runtime, metrics = _runtime(clock)
    breaker = runtime.breakers.get("order-service")
    for _ in range(5):
        breaker.record(breaker.admit(), Outcome.FAILURE)
    assert _value(metrics, "paymesh_breaker_state", **EDGE) == 2

    clock.advance(breaker.policy.open_s)

    assert runtime.breakers.states() == {"order-service": "half-open-ready"}
    assert _value(metrics, "paymesh_breaker_state", **EDGE) == 1
