"""The Grafana dashboard of the mesh, built with the Grafana Foundation SDK's typed builders.

``python -m services.tools.grafana_dashboard > deploy/grafana/paymesh.json`` writes the file; a
unit test fails when the file and this module disagree, so the JSON cannot drift from the SDK's
types. :data:`PANELS` lists every panel with its queries, so tests can evaluate them in Prometheus.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from grafana_foundation_sdk.builders import dashboard as board
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from services.tools.prometheus_config import JOB

UID = "paymesh-mesh"
#: Every panel reads the Prometheus data source the operator picks in this variable.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Codes the breaker counts as failures: an edge with these is unhealthy, not just refusing.
FAILURE_CODES = "UNAVAILABLE|DEADLINE_EXCEEDED|INTERNAL|UNKNOWN|DATA_LOSS"
EDGE = "{{caller}} \u2192 {{target}}"
CALLER = 'caller=~"$caller"'

Kind = Literal["stat", "timeseries", "state-timeline"]


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target of a panel and its legend."""

    expr: str
    legend: str = EDGE


@dataclass(frozen=True, slots=True, kw_only=True)
class PanelSpec:
    """What a panel shows; the builders below turn it into Grafana's model."""

    title: str
    kind: Kind
    queries: tuple[Query, ...]
    description: str = ""
    unit: str = ""
    width: int = 12
    height: int = 8
    thresholds: tuple[tuple[str, float | None], ...] = ()
    """(colour, from value) steps; the first starts at ``None`` (minus infinity)."""
    bars: bool = False


@dataclass(frozen=True, slots=True)
class RowSpec:
    """A row header and the panels under it."""

    title: str
    panels: tuple[PanelSpec, ...]


def _rate(series: str, by: str = "caller, target", window: str = "1m") -> str:
    return f"sum by ({by}) (rate({series}{{{CALLER}}}[{window}]))"


def _edge_rate(
    series: str,
    title: str,
    description: str = "",
    *,
    by: str = "caller, target",
    legend: str = EDGE,
    **extra: Any,
) -> PanelSpec:
    """A per-edge rate panel: the shape of most of the chain's counters."""
    return PanelSpec(
        title=title,
        kind="timeseries",
        queries=(Query(_rate(series, by), legend),),
        description=description,
        unit="reqps",
        **extra,
    )


_ALARM = (("green", None), ("red", 1.0))
_ERRORS = (
    f'sum by (caller, target) (rate(paymesh_client_rpcs_total{{{CALLER},code=~"{FAILURE_CODES}"}}'
    f"[1m])) / {_rate('paymesh_client_rpcs_total')}"
)

ROWS: tuple[RowSpec, ...] = (
    RowSpec(
        "At a glance",
        (
            PanelSpec(
                title="Open breakers",
                kind="stat",
                width=4,
                height=4,
                description="Edges whose circuit breaker is open right now.",
                queries=(
                    Query(
                        "count(max by (caller, target) "
                        f"(paymesh_breaker_state{{{CALLER}}}) == 2) or vector(0)",
                        "open",
                    ),
                ),
                thresholds=_ALARM,
            ),
            PanelSpec(
                title="Failing edges (error rate > 5%)",
                kind="stat",
                width=4,
                height=4,
                description="Edges where more than 5% of calls failed in a way that says the "
                "target is unhealthy.",
                queries=(Query(f"count(({_ERRORS}) > 0.05) or vector(0)", "failing"),),
                thresholds=_ALARM,
            ),
            PanelSpec(
                title="Extra load from retries",
                kind="stat",
                width=4,
                height=4,
                unit="percentunit",
                description="Retries as a share of first attempts across the selected callers "
                "(the budget caps it per target).",
                queries=(
                    Query(
                        f"sum(rate(paymesh_client_retries_total{{{CALLER}}}[5m])) / clamp_min("
                        f"sum(rate(paymesh_client_attempts_total{{{CALLER}}}[5m])) - "
                        f"sum(rate(paymesh_client_retries_total{{{CALLER}}}[5m])), 1e-9)",
                        "retries / first attempts",
                    ),
                ),
                thresholds=(("green", None), ("orange", 0.1), ("red", 0.2)),
            ),
            PanelSpec(
                title="Retry budget exhausted (5m)",
                kind="stat",
                width=4,
                height=4,
                queries=(
                    Query(
                        "sum(increase(paymesh_retry_budget_exhausted_total"
                        f"{{{CALLER}}}[5m])) or vector(0)",
                        "refused retries",
                    ),
                ),
                thresholds=(("green", None), ("orange", 1.0)),
            ),
            PanelSpec(
                title="Services up",
                kind="stat",
                width=8,
                height=4,
                queries=(
                    Query(f'sum(up{{job="{JOB}"}})', "up"),
                    Query(f'count(up{{job="{JOB}"}})', "scraped"),
                ),
            ),
        ),
    ),
    RowSpec(
        "Edges (client side, as each caller sees them)",
        (
            _edge_rate("paymesh_client_rpcs_total", "Requests per second per edge"),
            PanelSpec(
                title="Error rate per edge",
                kind="timeseries",
                unit="percentunit",
                description="Share of calls ending UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, "
                "UNKNOWN or DATA_LOSS: the codes the breaker counts.",
                queries=(Query(_ERRORS),),
            ),
            PanelSpec(
                title="p99 latency per edge",
                kind="timeseries",
                unit="s",
                description="As the caller sees it: retries and backoff included.",
                queries=(
                    Query(
                        "histogram_quantile(0.99, sum by (caller, target, le) (rate("
                        f"paymesh_client_rpc_duration_seconds_bucket{{{CALLER}}}[1m])))"
                    ),
                ),
            ),
            PanelSpec(
                title="Breaker state per edge",
                kind="state-timeline",
                description="0 closed, 1 half-open, 2 open.",
                queries=(Query(f"max by (caller, target) (paymesh_breaker_state{{{CALLER}}})"),),
                thresholds=(("green", None), ("yellow", 1.0), ("red", 2.0)),
            ),
        ),
    ),
    RowSpec(
        "Retries, budget and deadlines",
        (
            _edge_rate("paymesh_client_retries_total", "Retries per second per edge", width=8),
            _edge_rate(
                "paymesh_client_retry_stops_total",
                "Why retrying stopped",
                by="caller, target, reason",
                legend=f"{EDGE}: {{{{reason}}}}",
                width=8,
            ),
            _edge_rate("paymesh_retry_budget_exhausted_total", "Retry budget exhaustion", width=8),
            PanelSpec(
                title="Deadlines",
                kind="timeseries",
                unit="reqps",
                width=24,
                queries=(
                    Query(_rate("paymesh_client_deadline_exceeded_total"), f"exceeded {EDGE}"),
                    Query(_rate("paymesh_client_deadline_propagated_total"), f"propagated {EDGE}"),
                    Query(
                        _rate("paymesh_client_deadline_exhausted_total"), f"already spent {EDGE}"
                    ),
                ),
            ),
        ),
    ),
    RowSpec(
        "Breakers and local refusals",
        (
            PanelSpec(
                title="Breaker transitions",
                kind="timeseries",
                width=8,
                bars=True,
                queries=(
                    Query(
                        "sum by (caller, target, to_state) (increase("
                        f"paymesh_breaker_transitions_total{{{CALLER}}}[5m]))",
                        f"{EDGE} to {{{{to_state}}}}",
                    ),
                ),
            ),
            PanelSpec(
                title="Why breakers opened",
                kind="timeseries",
                width=8,
                bars=True,
                description="Trips by rule: failure_rate, consecutive_failures, slow_call_rate, "
                "trial_failed, trial_slow.",
                queries=(
                    Query(
                        "sum by (caller, target, rule) (increase("
                        f"paymesh_breaker_trips_total{{{CALLER}}}[5m]))",
                        f"{EDGE}: {{{{rule}}}}",
                    ),
                ),
            ),
            _edge_rate(
                "paymesh_breaker_rejections_total", "Breaker rejections (fail fast)", width=8
            ),
            _edge_rate(
                "paymesh_breaker_aborted_calls_total",
                "Calls failed in flight when a breaker opened",
                width=8,
            ),
            _edge_rate(
                "paymesh_client_concurrency_limited_total",
                "Calls refused at the concurrency limit",
                "Refused locally (CONCURRENCY_LIMITED) because the target had its limit of calls "
                "in flight; not breaker failures.",
                width=8,
            ),
            _edge_rate(
                "paymesh_client_tls_handshake_failures_total",
                "TLS handshake failures",
                "Untrusted, expired or wrong certificates; never retried.",
                width=8,
            ),
        ),
    ),
    RowSpec(
        "Servers",
        (
            PanelSpec(
                title="Incoming RPCs per second by code",
                kind="timeseries",
                unit="reqps",
                width=8,
                queries=(
                    Query(
                        "sum by (service, code) (rate(paymesh_server_rpcs_total[1m]))",
                        "{{service}} {{code}}",
                    ),
                ),
            ),
            PanelSpec(
                title="Server p99 latency",
                kind="timeseries",
                unit="s",
                width=8,
                queries=(
                    Query(
                        "histogram_quantile(0.99, sum by (service, le) "
                        "(rate(paymesh_server_rpc_duration_seconds_bucket[1m])))",
                        "{{service}}",
                    ),
                ),
            ),
            PanelSpec(
                title="Load shed (concurrency cap)",
                kind="timeseries",
                unit="reqps",
                width=8,
                description="Incoming RPCs refused at once because the service was at its cap.",
                queries=(
                    Query(
                        "sum by (service, method) (rate(paymesh_server_shed_total[1m]))",
                        "{{service}} {{method}}",
                    ),
                ),
            ),
        ),
    ),
)

#: Every panel in order, for tests that evaluate each query.
PANELS: tuple[PanelSpec, ...] = tuple(p for row in ROWS for p in row.panels)


def _thresholds(steps: Sequence[tuple[str, float | None]]) -> board.ThresholdsConfig:
    return (
        board.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(color=c, value=v) for c, v in steps])
    )


def _breaker_mappings() -> list[model.ValueMapping]:
    names = (("closed", "green"), ("half-open", "yellow"), ("open", "red"))
    return [
        model.ValueMap(
            options={
                str(i): model.ValueMappingResult(text=text, color=color, index=i)
                for i, (text, color) in enumerate(names)
            }
        )
    ]


def _panel(spec: PanelSpec, panel_id: int) -> Any:
    """The SDK builder of one panel (stat, time series or state timeline)."""
    builder: Any
    if spec.kind == "stat":
        builder = (
            stat.Panel()
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
            .color_mode(
                common.BigValueColorMode.BACKGROUND
                if spec.thresholds == _ALARM
                else common.BigValueColorMode.VALUE
            )
        )
    elif spec.kind == "state-timeline":
        builder = (
            statetimeline.Panel()
            .show_value(common.VisibilityMode.NEVER)
            .merge_values(True)
            .row_height(0.8)
            .mappings(_breaker_mappings())
            .color_scheme(board.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        )
    else:
        builder = (
            timeseries.Panel()
            .legend(
                VizLegendOptions()
                .display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.RIGHT)
                .show_legend(True)
                .calcs(["lastNotNull", "max"])
            )
            .tooltip(
                VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.NONE)
            )
        )
        if spec.bars:
            builder = builder.draw_style(common.GraphDrawStyle.BARS)
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .span(spec.width)
        .height(spec.height)
    )
    if spec.unit:
        builder = builder.unit(spec.unit)
    if spec.thresholds:
        builder = builder.thresholds(_thresholds(spec.thresholds))
    if spec.unit == "percentunit" and spec.kind == "timeseries":
        builder = builder.min(0).max(1)
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        builder = builder.with_target(
            prometheus.Dataquery()
            .ref_id(ref)
            .datasource(DATASOURCE)
            .expr(query.expr)
            .legend_format(query.legend)
        )
    return builder


def _variables() -> list[Any]:
    callers = "label_values(paymesh_breaker_state, caller)"
    return [
        board.DatasourceVariable("datasource").label("Prometheus").type("prometheus"),
        board.QueryVariable("caller")
        .label("Caller")
        .datasource(DATASOURCE)
        .query({"query": callers, "refId": "callers"})
        .include_all(True)
        .multi(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC),
    ]


def build() -> model.Dashboard:
    """The dashboard model: rows of panels laid out left to right, ids in order."""
    builder = (
        board.Dashboard("PayMesh: edges, breakers and retries")
        .uid(UID)
        .description(
            "Which edge is failing, which breakers are open, how much load retries add. Metrics "
            "from each service's admin /metrics (services/mesh/metrics.py)."
        )
        .tags(["paymesh", "grpc"])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-30m", "now")
        .version(1)
    )
    for variable in _variables():
        builder = builder.with_variable(variable)
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        builder = builder.with_row(board.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            builder = builder.with_panel(_panel(spec, panel_id))
    dashboard: model.Dashboard = builder.build()
    return dashboard


def render() -> str:
    """The JSON text of ``deploy/grafana/paymesh.json``."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    """Print the dashboard JSON."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
