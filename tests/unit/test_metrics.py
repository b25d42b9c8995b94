"""The Prometheus collectors: chain counters and breaker state at scrape time, server and
client series, bounded partner method labels, one registry per service."""

from __future__ import annotations

import grpc
from prometheus_client.parser import text_string_to_metric_families

from interceptors.breaker import BreakerRegistry, Outcome
from interceptors.policy import BreakerPolicy
from interceptors.telemetry import CallRecord, ChainTelemetry
from services.mesh.metrics import ServiceMetrics, method_label
from tests.unit.fakes import FakeClock

GET_ORDER = "/paymesh.order.v1.OrderService/GetOrder"


def _samples(metrics: ServiceMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return _samples(metrics).get((name, frozenset(labels.items())))


def _followed(
    telemetry: ChainTelemetry, breakers: BreakerRegistry, targets: tuple[str, ...]
) -> ServiceMetrics:
    metrics = ServiceMetrics(service="payment-gateway")
    metrics.follow_chain(telemetry, breakers.states, targets)
    return metrics


def _trip(breakers: BreakerRegistry, target: str) -> None:
    breaker = breakers.get(target)
    for _ in range(breaker.policy.minimum_calls):
        breaker.record(breaker.admit(), Outcome.FAILURE)


def test_chain_counters_are_exported_with_the_caller_and_total_suffix() -> None:
    telemetry = ChainTelemetry(caller="payment-gateway")
    telemetry.inc("attempts_total", 3, target="order-service", method=GET_ORDER)
    telemetry.inc("retries_total", 2, target="order-service", method=GET_ORDER)
    telemetry.inc("retry_stops_total", target="order-service", method=GET_ORDER, reason="budget")
    telemetry.inc("budget_exhausted_total", target="order-service")
    telemetry.inc("deadline_propagated_total", 4, target="order-service", method=GET_ORDER)
    metrics = _followed(telemetry, BreakerRegistry(lambda _: BreakerPolicy()), ())

    edge = {"caller": "payment-gateway", "target": "order-service", "method": GET_ORDER}
    assert _value(metrics, "paymesh_client_attempts_total", **edge) == 3
    assert _value(metrics, "paymesh_client_retries_total", **edge) == 2
    assert _value(metrics, "paymesh_client_retry_stops_total", **edge, reason="budget") == 1
    assert (
        _value(
            metrics,
            "paymesh_retry_budget_exhausted_total",
            caller="payment-gateway",
            target="order-service",
        )
        == 1
    )
    assert _value(metrics, "paymesh_client_deadline_propagated_total", **edge) == 4


def test_counters_are_read_at_scrape_time_not_copied_once() -> None:
    telemetry = ChainTelemetry(caller="payment-gateway")
    metrics = _followed(telemetry, BreakerRegistry(lambda _: BreakerPolicy()), ())
    edge = {"caller": "payment-gateway", "target": "risk-service", "method": GET_ORDER}
    assert _value(metrics, "paymesh_client_retries_total", **edge) is None

    telemetry.inc("retries_total", target="risk-service", method=GET_ORDER)

    assert _value(metrics, "paymesh_client_retries_total", **edge) == 1


def test_breaker_state_is_zero_closed_and_two_open_for_every_declared_edge() -> None:
    clock = FakeClock()
    breakers = BreakerRegistry(lambda _: BreakerPolicy(), clock=clock)
    telemetry = ChainTelemetry(caller="payment-gateway")
    metrics = _followed(telemetry, breakers, ("order-service", "risk-service"))

    _trip(breakers, "order-service")

    caller = {"caller": "payment-gateway"}
    assert _value(metrics, "paymesh_breaker_state", **caller, target="order-service") == 2
    # Never called, so no breaker exists yet: still a closed edge on the timeline.
    assert _value(metrics, "paymesh_breaker_state", **caller, target="risk-service") == 0


def test_breaker_state_is_one_while_half_open() -> None:
    clock = FakeClock()
    breakers = BreakerRegistry(lambda _: BreakerPolicy(), clock=clock)
    metrics = _followed(ChainTelemetry(caller="payment-gateway"), breakers, ("order-service",))
    _trip(breakers, "order-service")
    clock.advance(BreakerPolicy().open_s)

    breakers.get("order-service").admit()  # the first trial call moves it to half-open

    assert (
        _value(metrics, "paymesh_breaker_state", caller="payment-gateway", target="order-service")
        == 1
    )


def test_breaker_transitions_are_counted_from_and_to() -> None:
    runtime_telemetry = ChainTelemetry(caller="payment-gateway")
    breakers = BreakerRegistry(
        lambda _: BreakerPolicy(),
        clock=FakeClock(),
        on_transition=lambda target, old, new: runtime_telemetry.inc(
            "breaker_transitions_total", target=target, old=old, new=new
        ),
    )
    metrics = _followed(runtime_telemetry, breakers, ("order-service",))

    _trip(breakers, "order-service")

    assert (
        _value(
            metrics,
            "paymesh_breaker_transitions_total",
            caller="payment-gateway",
            target="order-service",
            from_state="closed",
            to_state="open",
        )
        == 1
    )


def test_client_calls_are_counted_by_code_and_timed() -> None:
    telemetry = ChainTelemetry(caller="payment-gateway")
    metrics = _followed(telemetry, BreakerRegistry(lambda _: BreakerPolicy()), ())

    for code, seconds in (("OK", 0.002), ("OK", 0.004), ("UNAVAILABLE", 0.3)):
        telemetry.record_call(
            CallRecord(target="order-service", method=GET_ORDER, code=code, duration_s=seconds)
        )

    edge = {"caller": "payment-gateway", "target": "order-service", "method": GET_ORDER}
    assert _value(metrics, "paymesh_client_rpcs_total", **edge, code="OK") == 2
    assert _value(metrics, "paymesh_client_rpcs_total", **edge, code="UNAVAILABLE") == 1
    assert _value(metrics, "paymesh_client_rpc_duration_seconds_count", **edge) == 3
    assert _value(metrics, "paymesh_client_rpc_duration_seconds_bucket", **edge, le="0.005") == 2


def test_server_rpcs_are_counted_by_service_method_and_code_and_timed() -> None:
    metrics = ServiceMetrics(service="order-service")

    metrics.observe_server(GET_ORDER, grpc.StatusCode.OK, 0.001)
    metrics.observe_server(GET_ORDER, grpc.StatusCode.NOT_FOUND, 0.001)

    labels = {"service": "order-service", "method": GET_ORDER}
    assert _value(metrics, "paymesh_server_rpcs_total", **labels, code="OK") == 1
    assert _value(metrics, "paymesh_server_rpcs_total", **labels, code="NOT_FOUND") == 1
    assert _value(metrics, "paymesh_server_rpc_duration_seconds_count", **labels) == 2


def test_each_service_has_its_own_registry() -> None:
    first, second = ServiceMetrics(service="order-service"), ServiceMetrics(service="order-service")

    first.observe_server(GET_ORDER, grpc.StatusCode.OK, 0.001)

    labels = {"service": "order-service", "method": GET_ORDER, "code": "OK"}
    assert _value(first, "paymesh_server_rpcs_total", **labels) == 1
    assert _value(second, "paymesh_server_rpcs_total", **labels) is None


def test_partner_method_labels_lose_queries_and_ids() -> None:
    assert method_label("GET /lookup?ip=203.0.113.7") == "GET /lookup"
    assert method_label("POST /charges/ch_8f3a91/refunds") == "POST /charges/:id/refunds"
    assert method_label("GET /v1/rates") == "GET /v1/rates"
    assert method_label(GET_ORDER) == GET_ORDER


def test_partner_calls_that_normalise_alike_add_up() -> None:
    telemetry = ChainTelemetry(caller="channel-adapter")
    telemetry.inc("attempts_total", target="payment-channel", method="POST /charges/ch_1/void")
    telemetry.inc("attempts_total", target="payment-channel", method="POST /charges/ch_2/void")
    metrics = ServiceMetrics(service="channel-adapter")
    metrics.follow_chain(telemetry, dict, ())

    assert (
        _value(
            metrics,
            "paymesh_client_attempts_total",
            caller="channel-adapter",
            target="payment-channel",
            method="POST /charges/:id/void",
        )
        == 2
    )


def test_server_latency_buckets_count_what_took_at_most_their_bound() -> None:
    metrics = ServiceMetrics(service="order-service")

    for elapsed_s in (0.001, 0.0011, 0.003, 60.0):
        metrics.observe_server(GET_ORDER, grpc.StatusCode.OK, elapsed_s)

    labels = {"service": "order-service", "method": GET_ORDER}
    bucket = "paymesh_server_rpc_duration_seconds_bucket"
    assert _value(metrics, bucket, **labels, le="0.001") == 1
    assert _value(metrics, bucket, **labels, le="0.0025") == 2
    assert _value(metrics, bucket, **labels, le="0.005") == 3
    assert _value(metrics, bucket, **labels, le="10.0") == 3
    assert _value(metrics, bucket, **labels, le="+Inf") == 4
    assert _value(metrics, "paymesh_server_rpc_duration_seconds_sum", **labels) == (
        0.001 + 0.0011 + 0.003 + 60.0
    )
