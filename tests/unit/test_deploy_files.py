"""deploy/prometheus.yml matches the topology; the Grafana dashboard reads only series we export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from interceptors.telemetry import CallRecord, ChainTelemetry
from services.mesh.metrics import CHAIN_SERIES, ServiceMetrics
from services.mesh.topology import Topology
from services.tools.prometheus_config import render

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "paymesh.json").read_text())
    return data


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]


def exported_sample_names() -> set[str]:
    """Every sample name a service exposes once each series has a value."""
    telemetry = ChainTelemetry(caller="payment-gateway")
    for key, series in CHAIN_SERIES.items():
        telemetry.inc(key, 1, **dict.fromkeys(series.labels, "x"))
    metrics = ServiceMetrics(service="payment-gateway")
    metrics.follow_chain(telemetry, dict, ("order-service",))
    metrics.observe_client(
        CallRecord(target="order-service", method="/x.v1.X/Y", code="OK", duration_s=0.001)
    )
    metrics.observe_server("/x.v1.X/Y", grpc.StatusCode.OK, 0.001)
    text = metrics.exposition().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_prometheus_config_is_the_one_the_topology_gives() -> None:
    expected = render(Topology(environ={}))

    assert (DEPLOY / "prometheus.yml").read_text() == expected, (
        "deploy/prometheus.yml is stale: python -m services.tools.prometheus_config > "
        "deploy/prometheus.yml (with no *_ADMIN_ADDR overrides set)"
    )


def test_prometheus_config_scrapes_every_admin_port() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    topology = Topology(environ={})

    for spec in topology.services:
        assert f'"127.0.0.1:{spec.admin_port}"' in text
        assert f"service: {spec.name}" in text


def test_dashboard_queries_only_series_the_services_export() -> None:
    known = exported_sample_names() | {"up"}
    used = {
        name
        for expr in _expressions(_dashboard())
        for name in re.findall(r"\b(paymesh_[a-z_]+|up)\b", expr)
    }

    assert used, "the dashboard has no queries"
    assert used <= known, f"unknown series: {sorted(used - known)}"


def test_dashboard_shows_what_an_operator_asks_first() -> None:
    exprs = " ".join(_expressions(_dashboard()))

    for series in (
        "paymesh_client_rpcs_total",  # RPS and error rate per edge
        "paymesh_client_rpc_duration_seconds_bucket",  # p99
        "paymesh_breaker_state",  # breaker timeline
        "paymesh_client_retries_total",
        "paymesh_retry_budget_exhausted_total",
    ):
        assert series in exprs
    kinds = {p["type"] for p in _dashboard()["panels"]}
    assert "state-timeline" in kinds
