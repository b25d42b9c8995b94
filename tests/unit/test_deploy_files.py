"""deploy/prometheus.yml matches the topology; the Grafana dashboard is the one the SDK builders
write, is well formed (ids, grid, datasource, variables) and reads every series we export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client.parser import text_string_to_metric_families

from interceptors.telemetry import CallRecord, ChainTelemetry
from services.mesh.metrics import CHAIN_SERIES, ServiceMetrics
from services.mesh.topology import Topology
from services.tools import grafana_dashboard
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
    metrics.count_shed("/x.v1.X/Y")
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


def test_dashboard_is_the_one_the_builders_write() -> None:
    assert (DEPLOY / "grafana" / "paymesh.json").read_text() == grafana_dashboard.render(), (
        "deploy/grafana/paymesh.json is stale: python -m services.tools.grafana_dashboard > "
        "deploy/grafana/paymesh.json"
    )


def test_dashboard_reads_back_through_the_sdk_model_unchanged() -> None:
    dashboard = _dashboard()

    model = Dashboard.from_json(dashboard)

    assert json.loads(json.dumps(model, cls=JSONEncoder)) == dashboard


def test_dashboard_panels_have_unique_ids_and_do_not_overlap_on_the_grid() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    cells: dict[tuple[int, int], str] = {}

    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_reads_the_templated_prometheus_datasource() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    reference = {"type": "prometheus", "uid": "${datasource}"}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["caller"]["datasource"] == reference
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference, panel["title"]


def test_every_variable_a_query_uses_is_defined() -> None:
    dashboard = _dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {
        name
        for expr in _expressions(dashboard)
        for name in re.findall(r"\$\{?([A-Za-z_]\w*)", expr)
        if not name.startswith("__")  # Grafana's built-ins ($__rate_interval...)
    }

    assert used == {"caller"} and used <= defined


def test_dashboard_has_a_panel_for_every_series_the_services_export() -> None:
    used = " ".join(_expressions(_dashboard()))
    families = {
        re.sub(r"_(bucket|count|sum|created)$", "", name) for name in exported_sample_names()
    }

    missing = sorted(f for f in families if f not in used and f"{f}_bucket" not in used)

    assert not missing, f"series without a panel: {missing}"


def test_panel_specs_and_json_list_the_same_queries() -> None:
    assert [q.expr for p in grafana_dashboard.PANELS for q in p.queries] == _expressions(
        _dashboard()
    )
