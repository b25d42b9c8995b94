"""The throughput bench's cache-cold workload is what it claims (every request valid, many
merchants and keys, fresh IPs, cross-currency payments, both kinds of decline) and its CPU
accounting keeps the services, the other members and the load generator apart."""

from __future__ import annotations

import collections
import ipaddress

from bench.mesh_throughput import (
    LOAD_GENERATOR,
    ColdWorkload,
    Merchant,
    Samples,
    cpu_per_payment,
)
from services.mesh.validation import CURRENCY_EXPONENT
from services.payment_gateway.servicer import validate_create

PAYMENTS = 4000


def _merchants(count: int) -> list[Merchant]:
    currencies = sorted(CURRENCY_EXPONENT)
    return [
        Merchant(
            f"m_{i:016x}",
            currencies[i % len(currencies)],
            tuple(((("authorization", f"Bearer key-{i}-{k}"),)) for k in range(1 + i % 2)),
        )
        for i in range(count)
    ]


def test_cold_workload_spreads_over_merchants_keys_ips_and_currencies() -> None:
    merchants = _merchants(50)
    workload = ColdWorkload(merchants)
    payments = [workload.next() for _ in range(PAYMENTS)]
    for p in payments:
        validate_create(p.request)  # raises on any invalid field
        assert p.request.merchant_id == merchants[p.merchant].merchant_id
        assert p.metadata in merchants[p.merchant].keys
        assert p.request.settlement_currency_code == merchants[p.merchant].currency
        assert ipaddress.ip_address(p.request.customer_ip).is_global or (
            p.request.customer_ip.startswith("203.0.113.")
        )
    requests = [p.request for p in payments]
    assert len({r.request_id for r in requests}) == PAYMENTS
    assert len({p.merchant for p in payments}) == len(merchants)
    assert len({p.metadata for p in payments}) == sum(len(m.keys) for m in merchants)
    assert len({r.customer_ip for r in requests}) > 0.99 * PAYMENTS  # geo-IP caches miss
    assert {r.amount.currency_code for r in requests} == set(CURRENCY_EXPONENT)
    cross = sum(r.amount.currency_code != r.settlement_currency_code for r in requests)
    card = sum(r.payment_method_token.startswith("tok_decline") for r in requests)
    risk = sum(r.customer_ip.startswith("203.0.113.") for r in requests)
    assert 0.4 * PAYMENTS < cross < 0.6 * PAYMENTS
    assert 0.02 * PAYMENTS < card < 0.08 * PAYMENTS
    assert 0.01 * PAYMENTS < risk < 0.05 * PAYMENTS


def test_cpu_per_payment_keeps_the_other_processes_apart() -> None:
    spent_s = {
        "payment-gateway": 0.6,
        "risk-service": 0.2,
        "partner-sandbox": 0.1,
        LOAD_GENERATOR: 0.05,
    }
    cpu = cpu_per_payment(spent_s, 100)
    assert cpu["services_ms"] == {"payment-gateway": 6.0, "risk-service": 2.0}
    assert cpu["mesh_ms"] == 8.0
    assert cpu["services_share"] == {"payment-gateway": 0.75, "risk-service": 0.25}
    assert cpu["others_ms"] == {"partner-sandbox": 1.0}
    assert cpu["load_generator_ms"] == 0.5


def test_samples_of_alternating_rounds_add_up() -> None:
    samples = Samples(
        latencies=[i / 1000 for i in range(1, 101)],
        outcomes=collections.Counter(succeeded=90, declined=10),
        errors=collections.Counter(UNAVAILABLE=2),
        seconds=4.0,
        cpu_s={"payment-gateway": 0.5, LOAD_GENERATOR: 0.1},
        settle_s=0.5,
    )
    summary = samples.summary()
    assert summary["rps"] == 25.0
    assert summary["p50_ms"] == 50.0
    assert summary["p99_ms"] == 99.0
    assert summary["errors"] == 2
    assert summary["outcomes"] == {"succeeded": 90, "declined": 10}
    assert summary["cpu_ms_per_payment"]["mesh_ms"] == 5.0
