"""One failing workload through a gRPC target and an HTTP partner: the same counters on both.

Both edges go through the one attempt loop with the same policy; the counters are read from
the Prometheus registry a service exports (``ServiceMetrics``), incremented only by running the
chain against a real grpc.aio server whose servicer fails and a real HTTP server answering 503.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from interceptors.chain import ClientChain, build_client_chain
from interceptors.deadline import reset_incoming_deadline, set_incoming_deadline
from interceptors.errors import CallError, PartnerCallError
from interceptors.policy import PolicyConfig
from paymesh.testing.v1 import testing_pb2 as pb
from services.mesh.metrics import ServiceMetrics
from tests.integration.harness import TARGET, Fault, serving, stub_for
from tests.integration.http_partner import Answer, scripted_partner

PARTNER = "exchange-rate"
CALLS = 8
#: Three attempts at most, two retries in the budget, the fourth failure in a row opens.
POLICY: dict[str, Any] = {
    "retry": {"max_attempts": 3, "initial_backoff_s": 0.0},
    "budget": {"retry_ratio": 0.0, "min_retries": 2},
    "breaker": {"consecutive_failures": 4, "minimum_calls": 1000, "open_s": 600.0},
}
#: What CALLS failing calls must add up to on either edge: call 1 makes 3 attempts (2
#: retries, attempts exhausted), call 2 fails once, trips the breaker, and finds the budget
#: spent; calls 3 to 8 are refused by the open breaker without being sent.
EXPECTED = {
    "paymesh_client_rpcs_total": CALLS,
    "paymesh_client_attempts_total": 4,
    "paymesh_client_retries_total": 2,
    "paymesh_client_retry_stops_total|attempts_exhausted": 1,
    "paymesh_client_retry_stops_total|budget": 1,
    "paymesh_client_retry_stops_total|breaker_open": CALLS - 2,
    "paymesh_retry_budget_exhausted_total": 1,
    "paymesh_breaker_rejections_total": CALLS - 2,
    "paymesh_breaker_trips_total": 1,
    "paymesh_breaker_transitions_total": 1,
    "paymesh_breaker_state": 2,
}


def chain_and_metrics(config: PolicyConfig) -> tuple[ClientChain, ServiceMetrics]:
    chain = build_client_chain(caller="edge-caller", config=config, rng=lambda: 0.0)
    metrics = ServiceMetrics(service="edge-caller")
    metrics.follow_chain(chain.telemetry, chain.breakers.states, (TARGET, PARTNER))
    return chain, metrics


def edge_counters(metrics: ServiceMetrics, target: str) -> dict[str, float]:
    """The chain's series of one target, summed over methods and codes (stop reasons apart)."""
    out: dict[str, float] = defaultdict(float)
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("target") != target or sample.name.endswith("_created"):
                continue
            if sample.name.startswith("paymesh_client_rpc_duration"):
                continue  # latencies differ by transport; their count is the calls counter
            key = sample.name
            if "reason" in sample.labels:
                key += f"|{sample.labels['reason']}"
            out[key] += sample.value
    return {k: v for k, v in out.items() if v}


async def test_grpc_and_http_edges_report_the_same_counters_for_the_same_failures() -> None:
    chain, metrics = chain_and_metrics(PolicyConfig.from_mapping({"defaults": POLICY}))
    grpc_errors: list[CallError] = []
    http_errors: list[PartnerCallError] = []
    async with serving() as srv, scripted_partner() as partner:
        srv.servicer.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
        partner.default = Answer(status=503)
        async with stub_for(chain, srv.address) as stub:
            for _ in range(CALLS):
                with pytest.raises(CallError) as caught:
                    await stub.Read(pb.ReadRequest(text="x"))
                grpc_errors.append(caught.value)
        client = chain.http_client(PARTNER, partner.url)
        try:
            for _ in range(CALLS):
                with pytest.raises(PartnerCallError) as raised:
                    await client.request("GET", "/rates")
                http_errors.append(raised.value)
        finally:
            await client.aclose()
    assert (srv.servicer.count(), partner.count()) == (4, 4)
    grpc_side, http_side = edge_counters(metrics, TARGET), edge_counters(metrics, PARTNER)
    assert grpc_side == EXPECTED
    assert http_side == EXPECTED
    # The callers see the same stops, attempt counts and codes, whatever the transport.
    assert [(e.code(), e.attempts, e.stop_reason) for e in grpc_errors] == [
        (e.code(), e.attempts, e.stop_reason) for e in http_errors
    ]


@contextlib.contextmanager
def caller_deadline(seconds: float) -> Iterator[None]:
    """As inside a handler whose caller gave it ``seconds`` (shorter than the policy's)."""
    token = set_incoming_deadline(seconds)
    try:
        yield
    finally:
        reset_incoming_deadline(token)


async def test_both_edges_count_a_propagated_deadline_that_ran_out_alike() -> None:
    config = PolicyConfig.from_mapping({"defaults": {"retry": {"max_attempts": 1}}})
    chain, metrics = chain_and_metrics(config)
    async with serving() as srv, scripted_partner() as partner:
        srv.servicer.default = Fault(hold_s=2.0)
        partner.default = Answer(hold_s=2.0)
        client = chain.http_client(PARTNER, partner.url)
        try:
            async with stub_for(chain, srv.address) as stub:
                for _ in range(2):
                    with caller_deadline(0.3), pytest.raises(CallError) as caught:
                        await stub.Read(pb.ReadRequest())
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(2):
                with caller_deadline(0.3), pytest.raises(PartnerCallError) as raised:
                    await client.request("GET", "/rates")
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await client.aclose()
    expected = {
        "paymesh_client_rpcs_total": 2,
        "paymesh_client_attempts_total": 2,
        "paymesh_client_deadline_propagated_total": 2,
        "paymesh_client_deadline_exceeded_total": 2,
        "paymesh_client_retry_stops_total": 2,
    }
    for side in (edge_counters(metrics, TARGET), edge_counters(metrics, PARTNER)):
        stops = sum(v for k, v in side.items() if k.startswith("paymesh_client_retry_stops"))
        counted = {k: v for k, v in side.items() if not k.startswith("paymesh_client_retry_stops")}
        assert {**counted, "paymesh_client_retry_stops_total": stops} == expected
    # The caller's short deadline says nothing of the targets: neither breaker counted it.
    assert chain.breakers.states() == {TARGET: "closed", PARTNER: "closed"}


async def test_partner_route_takes_its_methods_policy() -> None:
    config = PolicyConfig.from_mapping(
        {
            "defaults": {
                "retry": {"max_attempts": 4, "initial_backoff_s": 0.0},
                "breaker": {"consecutive_failures": 1000, "minimum_calls": 1000},
            },
            "methods": {
                f"/{PARTNER}/GET /rates/:id": {"retry": {"max_attempts": 2}},
                f"/{PARTNER}/GET /quotes/{{}}": {"retry": {"max_attempts": 1}},
            },
        }
    )
    chain, _ = chain_and_metrics(config)
    async with scripted_partner() as partner:
        partner.default = Answer(status=503)
        client = chain.http_client(PARTNER, partner.url)
        try:
            for path, route in (("/rates/42", None), ("/rates", None), ("/quotes/7", "/quotes/{}")):
                with pytest.raises(PartnerCallError):
                    await client.request("GET", path, route=route)
        finally:
            await client.aclose()
    # /rates/42 is the route /rates/:id; /rates has no override; /quotes/7 named its template.
    assert (partner.count("/rates/42"), partner.count("/rates"), partner.count("/quotes/7")) == (
        2,
        4,
        1,
    )


async def test_retryable_codes_of_the_policy_decide_what_a_grpc_call_retries() -> None:
    config = PolicyConfig.from_mapping(
        {"defaults": {"retry": {"retryable_codes": ["INTERNAL"], "initial_backoff_s": 0.0}}}
    )
    chain, _ = chain_and_metrics(config)
    async with serving() as srv, stub_for(chain, srv.address) as stub:
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.INTERNAL))
        assert (await stub.Read(pb.ReadRequest())).attempt == 2
        srv.servicer.fail("Read", Fault(code=grpc.StatusCode.UNAVAILABLE))
        with pytest.raises(CallError) as caught:  # no longer retried: the policy left it out
            await stub.Read(pb.ReadRequest())
    assert (caught.value.attempts, caught.value.stop_reason) == (1, "not_retryable")
