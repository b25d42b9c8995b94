"""The chain's exported counters come from running the chain, on both transports.

One failing workload goes through the aio gRPC chain (a real server failing UNAVAILABLE) and
through the HTTP partner chain (a real HTTP server answering 503); the counters are read
from the Prometheus series a service serves, with ``ServiceMetrics`` following the chain as
the bootstrap wires it. Nothing here increments a counter by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from interceptors.errors import CallError
from paymesh.testing.v1 import testing_pb2 as pb
from services.mesh.metrics import ServiceMetrics
from tests.integration.harness import TARGET, Fault, make_chain, serving, stub_for
from tests.integration.test_chain_http import PARTNER, Reply, partner_server

CALLER = "test-caller"
NO_BREAKER = {"breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000}}
#: The HTTP edge reports these series apart from the gRPC edge until one observer owns every
#: counter (issue 14, point 1); strict, so the fix shows up as a pass to be unmarked.


@dataclass(frozen=True, slots=True)
class Run:
    """What a workload left: the exported series, the edge's labels, attempts the server saw."""

    metrics: ServiceMetrics
    target: str
    method: str
    seen: int

    def value(self, name: str, **labels: str) -> float:
        wanted = {"caller": CALLER, "target": self.target, **labels}
        text = self.metrics.exposition().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return float(sample.value)
        return 0.0

    def edge(self, name: str, **labels: str) -> float:
        """A per-method series of the edge."""
        return self.value(name, method=self.method, **labels)


async def _failing_workload(transport: str, policy: dict[str, Any], calls: int) -> Run:
    """``calls`` calls through the real chain of ``transport``, every attempt failing."""
    chain = make_chain(policy)
    metrics = ServiceMetrics(service=CALLER)
    if transport == "grpc":
        async with serving() as srv:
            srv.servicer.default = Fault(code=grpc.StatusCode.UNAVAILABLE)
            async with stub_for(chain, srv.address) as stub:
                for _ in range(calls):
                    with pytest.raises(CallError):
                        await stub.Read(pb.ReadRequest(text="x"))
        metrics.follow_chain(chain.telemetry, chain.breakers.states, (TARGET,))
        return Run(metrics, TARGET, "/paymesh.testing.v1.TestService/Read", srv.servicer.count())
    with partner_server() as partner:
        partner.default = Reply(503)
        client = chain.http_client(PARTNER, partner.url)
        for _ in range(calls):
            with pytest.raises(CallError):
                await client.request("GET", "/rates")
    metrics.follow_chain(chain.telemetry, chain.breakers.states, (PARTNER,))
    return Run(metrics, PARTNER, "GET /rates", partner.count())


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_calls_failing_until_the_breaker_opens_are_counted(transport: str) -> None:
    run = await _failing_workload(transport, {"retry": {"max_attempts": 3}}, calls=8)
    # 3 attempts fail, 2 more trip the breaker (5 in a row): the second call's third attempt
    # and the 6 calls after it are refused.
    assert run.seen == 5
    assert run.edge("paymesh_client_rpcs_total", code="UNAVAILABLE") == 8
    assert run.edge("paymesh_client_retries_total") == 4
    assert run.edge("paymesh_client_retry_stops_total", reason="attempts_exhausted") == 1
    assert run.edge("paymesh_client_retry_stops_total", reason="breaker_open") == 7
    assert run.value("paymesh_breaker_trips_total", rule="consecutive_failures") == 1
    assert run.value("paymesh_breaker_transitions_total", from_state="closed", to_state="open") == 1
    assert run.value("paymesh_breaker_state") == 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_calls_the_open_breaker_refused_are_counted(transport: str) -> None:
    run = await _failing_workload(transport, {"retry": {"max_attempts": 3}}, calls=8)
    assert run.value("paymesh_breaker_rejections_total") == 7


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_retries_the_budget_refused_are_counted(transport: str) -> None:
    policy = {"budget": {"retry_ratio": 0.2, "min_retries": 3}, **NO_BREAKER}
    run = await _failing_workload(transport, policy, calls=20)
    stopped = run.edge("paymesh_client_retry_stops_total", reason="budget")
    assert stopped > 0
    assert run.value("paymesh_retry_budget_exhausted_total") == stopped
