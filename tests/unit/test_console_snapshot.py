"""The mesh console's model: layout from the topology, edges from the callers' reports, breaker
details from ``/breakers``, errors newest first."""

from __future__ import annotations

from services.mesh.topology import PARTNERS, SERVICES, Topology
from services.tools.console.snapshot import (
    HEIGHT,
    WIDTH,
    edges,
    errors,
    layout,
    node_health,
    with_breaker_details,
)
from services.tools.status import DOWN, EdgeStatus, ServiceStatus

TOPOLOGY = Topology(environ={})


def _edge(name: str, **changes: object) -> EdgeStatus:
    values: dict[str, object] = {
        "name": name,
        "kind": "service",
        "target": "127.0.0.1:1",
        "health": "SERVING",
        "breaker": "closed",
        "recent_calls": 30,
        "error_rate": 0.25,
        "p99_ms": 12,
        "retries_per_s": 0.5,
        "last_error": "",
        "last_error_time": "",
        "window_s": 60.0,
    }
    values.update(changes)
    return EdgeStatus(**values)  # type: ignore[arg-type]  # the fields, by name


def _service(name: str, *found: EdgeStatus, **changes: object) -> ServiceStatus:
    values: dict[str, object] = {
        "name": name,
        "address": "127.0.0.1:1",
        "health": "SERVING",
        "liveness": "SERVING",
        "readiness": "SERVING",
        "edges": found,
    }
    values.update(changes)
    return ServiceStatus(**values)  # type: ignore[arg-type]  # the fields, by name


def test_layout_places_every_service_and_partner_inside_the_drawing_once() -> None:
    nodes = layout(TOPOLOGY)
    assert sorted(n.id for n in nodes) == sorted(
        [*(s.name for s in SERVICES), *(p.name for p in PARTNERS)]
    )
    assert all(0 < n.x < WIDTH and 0 < n.y < HEIGHT for n in nodes)
    assert len({(n.x, n.y) for n in nodes}) == len(nodes)


def test_layout_puts_callers_left_of_what_they_call_but_for_the_edges_closing_a_cycle() -> None:
    at = {n.id: n for n in layout(TOPOLOGY)}
    forward = [(s.name, t) for s in SERVICES for t in s.calls if at[s.name].x < at[t].x]
    total = sum(len(s.calls) for s in SERVICES)
    assert len(forward) >= total - 4  # notification and merchant-auth call back to merchant
    assert all(at[p.name].x == max(n.x for n in at.values()) for p in PARTNERS)


def test_layout_is_the_same_on_every_refresh() -> None:
    assert layout(TOPOLOGY) == layout(TOPOLOGY)


def test_an_edge_reports_its_rate_per_second_error_percent_and_breaker_of_the_page() -> None:
    gateway = _service("payment-gateway", _edge("risk-service", breaker="OPEN", recent_calls=120))
    statuses = [gateway, *(_service(s.name) for s in SERVICES if s.name != gateway.name)]

    found = {e["id"]: e for e in edges(TOPOLOGY, statuses)}

    edge = found["payment-gateway->risk-service"]
    assert (edge["rate_per_s"], edge["error_pct"], edge["breaker"]) == (2.0, 25.0, "open")
    assert edge["known"] and edge["p99_ms"] == 12
    assert found["payment-gateway->order-service"]["known"] is False  # not in its report


def test_a_down_caller_leaves_its_declared_edges_unknown() -> None:
    statuses = [_service(s.name, health=DOWN, error="health check: UNAVAILABLE") for s in SERVICES]
    found = edges(TOPOLOGY, statuses)
    assert len(found) == sum(len(s.calls) + len(s.partners) for s in SERVICES)
    assert {(e["known"], e["breaker"]) for e in found} == {(False, "none")}
    assert node_health(statuses[0]) == "down"


def test_breaker_details_add_time_left_open_and_the_retry_budget() -> None:
    gateway = _service("payment-gateway", _edge("risk-service", breaker="OPEN"))
    statuses = [gateway, *(_service(s.name) for s in SERVICES if s.name != gateway.name)]
    details = {
        "payment-gateway": {
            "breaker_details": {"risk-service": {"state": "open", "open_left_s": 2.5}},
            "budgets": {"risk-service": {"first_attempts": 9, "retries": 1, "exhausted_total": 0}},
        }
    }

    found = {e["id"]: e for e in with_breaker_details(edges(TOPOLOGY, statuses), details)}

    assert found["payment-gateway->risk-service"]["open_left_s"] == 2.5
    assert found["payment-gateway->risk-service"]["budget"]["first_attempts"] == 9
    assert found["merchant-service->risk-service"]["open_left_s"] is None
    assert found["merchant-service->risk-service"]["budget"] is None


def test_errors_are_listed_newest_first_with_where_they_happened() -> None:
    statuses = [
        _service(
            "payment-gateway",
            _edge("risk-service", last_error="old", last_error_time="2026-01-01T10:00:00+00:00"),
            _edge("order-service", last_error="new", last_error_time="2026-01-01T11:00:00+00:00"),
        ),
        _service("order-service"),
    ]
    found = errors(statuses, now=0.0)
    assert [(e["where"], e["message"]) for e in found] == [
        ("payment-gateway->order-service", "new"),
        ("payment-gateway->risk-service", "old"),
    ]
