"""What the mesh console shows: one JSON snapshot of the mesh, made from what services expose.

Health, Diagnostics and the launcher's restarts come from ``make status``'s own gathering
(:func:`services.tools.status.report_once`, over mTLS as the operator); each service's admin
``/breakers`` adds the time an open breaker has left and the retry budget. The graph's layout
follows the topology's call edges, so the page only draws it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from services.mesh.topology import Topology
from services.tools.replicas import service_of
from services.tools.status import (
    DOWN,
    SERVING,
    EdgeStatus,
    ServiceStatus,
    Summary,
    report_once,
)
from services.tools.supervisor import LauncherReport

#: How long one service's admin endpoint may take to give its breakers.
BREAKERS_TIMEOUT_S = 1.0
#: Most errors listed, newest first.
MAX_ERRORS = 20
#: Drawing area of the graph (SVG user units); the page scales it.
WIDTH, HEIGHT = 1200.0, 600.0
#: A column of one or two nodes sits this far above or below the middle, alternately, so a
#: line between two such columns does not run through the one between them.
STAGGER = 0.2
#: Kinds of dependency that are calls (edges of the graph); databases and caches are not.
CALLED = ("service", "partner")
#: Breaker names of ``make status`` as the page's ``data-breaker`` values.
_BREAKERS = {
    "-": "none",
    "closed": "closed",
    "OPEN": "open",
    "HALF-OPEN": "half-open",
    "HALF-OPEN-READY": "half-open-ready",
}


@dataclass(frozen=True, slots=True)
class Node:
    """A service or partner where the page draws it."""

    id: str
    kind: str
    x: float
    y: float


def layout(topology: Topology) -> list[Node]:
    """Services in columns by call depth (callers left of callees), partners in the last.

    Depth is the longest call path from the service, cycles cut at the edge that closes them
    (in topology order), so the layout is the same on every refresh.
    """
    calls = {s.name: tuple(s.calls) for s in topology.services}
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def height(name: str) -> int:
        if name in depth:
            return depth[name]
        visiting.add(name)
        below = [height(t) for t in calls[name] if t not in visiting]
        visiting.discard(name)
        depth[name] = 1 + max(below, default=-1)
        return depth[name]

    for spec in topology.services:
        height(spec.name)
    deepest = max(depth.values(), default=0)
    columns: dict[int, list[tuple[str, str]]] = {}
    for spec in topology.services:
        columns.setdefault(deepest - depth[spec.name], []).append((spec.name, "service"))
    columns[deepest + 1] = [(p.name, "partner") for p in topology.partners]
    step_x = WIDTH / (len(columns) + 0.2)
    nodes = []
    for column, members in sorted(columns.items()):
        step_y = HEIGHT / len(members)
        shift = (1 if column % 2 else -1) * STAGGER * HEIGHT if len(members) < 3 else 0.0
        for row, (name, kind) in enumerate(members):
            x = step_x * (column + 0.6)
            y = step_y * (row + 0.5) + shift
            nodes.append(Node(name, kind, round(x, 1), round(y, 1)))
    return nodes


def _edge(
    caller: ServiceStatus, target: str, kind: str, found: EdgeStatus | None
) -> dict[str, Any]:
    """One call edge of the page: the caller's Diagnostics figures, or unknown without them."""
    if found is None:
        return {
            "id": f"{caller.name}->{target}",
            "caller": caller.name,
            "target": target,
            "kind": kind,
            "known": False,
            "health": "-",
            "breaker": "none",
            "calls": 0,
            "rate_per_s": 0.0,
            "error_pct": 0.0,
            "p50_ms": 0,
            "p99_ms": 0,
            "retries_per_s": 0.0,
            "last_error": "",
            "last_error_time": "",
        }
    return {
        "id": f"{caller.name}->{target}",
        "caller": caller.name,
        "target": target,
        "kind": kind,
        "known": True,
        "health": found.health,
        "breaker": _BREAKERS.get(found.breaker, "none"),
        "calls": found.recent_calls,
        "rate_per_s": round(found.recent_calls / found.window_s, 2) if found.window_s else 0.0,
        "error_pct": round(found.error_rate * 100, 1),
        "p50_ms": found.p50_ms,
        "p99_ms": found.p99_ms,
        "retries_per_s": round(found.retries_per_s, 2),
        "last_error": found.last_error,
        "last_error_time": found.last_error_time,
    }


def edges(topology: Topology, statuses: Sequence[ServiceStatus]) -> list[dict[str, Any]]:
    """Every call edge the topology declares, with what its caller reports about it."""
    by_name = {s.name: s for s in statuses}
    out = []
    for spec in topology.services:
        status = by_name[spec.name]
        reported = {e.name: e for e in status.edges if e.kind in CALLED}
        declared = [(t, "service") for t in spec.calls] + [(p, "partner") for p in spec.partners]
        out += [_edge(status, target, kind, reported.get(target)) for target, kind in declared]
    return out


def with_breaker_details(
    found: list[dict[str, Any]], details: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``found`` with each edge's time left open and retry budget from its caller's
    ``/breakers`` (``None`` where the caller did not give them)."""
    for edge in found:
        report = details.get(edge["caller"], {})
        breaker = report.get("breaker_details", {}).get(edge["target"], {})
        left = breaker.get("open_left_s")
        edge["open_left_s"] = float(left) if isinstance(left, int | float) else None
        budget = report.get("budgets", {}).get(edge["target"])
        edge["budget"] = dict(budget) if isinstance(budget, Mapping) else None
    return found


def errors(statuses: Sequence[ServiceStatus], now: float) -> list[dict[str, str]]:
    """The newest errors: every edge's last error, and why a service gave no report."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
    found = [
        {
            "where": f"{s.name}->{e.name}",
            "time": e.last_error_time,
            "message": e.last_error,
        }
        for s in statuses
        for e in s.edges
        if e.last_error
    ]
    found += [{"where": s.name, "time": stamp, "message": s.error} for s in statuses if s.error]
    found.sort(key=lambda item: item["time"], reverse=True)
    return found[:MAX_ERRORS]


def members(report: LauncherReport | None) -> list[dict[str, Any]]:
    """The launcher's members (services, sandbox, console) with restarts or a crash loop."""
    if report is None:
        return []
    return [asdict(m) for m in report.members]


def node_health(status: ServiceStatus) -> str:
    """``serving``, ``degraded``, ``not-serving``, ``not-ready`` or ``down`` for the node colour."""
    if status.health == DOWN:
        return "down"
    if status.health != SERVING:
        return "not-ready"
    return (status.overall or SERVING).lower().replace("_", "-")


async def breaker_details(
    topology: Topology, session: aiohttp.ClientSession
) -> dict[str, dict[str, Any]]:
    """Each service's admin ``/breakers`` (breaker details and budgets); missing when its
    admin endpoint does not answer."""

    async def one(name: str) -> tuple[str, dict[str, Any] | None]:
        url = f"http://{topology.admin_address(name)}/breakers"
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=BREAKERS_TIMEOUT_S)
            ) as reply:
                if reply.status != 200:
                    return name, None
                body = await reply.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return name, None
        return name, body if isinstance(body, dict) else None

    answers = await asyncio.gather(*(one(s.name) for s in topology.services))
    return {name: body for name, body in answers if body is not None}


def snapshot_json(
    topology: Topology,
    statuses: Sequence[ServiceStatus],
    summary: Summary,
    report: LauncherReport | None,
    details: Mapping[str, Mapping[str, Any]],
    *,
    now: float,
) -> dict[str, Any]:
    """The page's whole model: summary, nodes, edges, members and errors."""
    by_name = {s.name: s for s in statuses}
    nodes = []
    for node in layout(topology):
        item: dict[str, Any] = asdict(node)
        status = by_name.get(node.id)
        item["health"] = node_health(status) if status else "partner"
        item["reason"] = (status.status_reason or status.error) if status else ""
        # Every replica of the service (one row of ``make status`` each), for the title.
        item["replicas"] = [
            {"name": s.name, "address": s.address, "health": node_health(s)}
            for s in statuses
            if status and service_of(s.name) == node.id
        ]
        healths = {r["health"] for r in item["replicas"]}
        if len(item["replicas"]) > 1 and len(healths) > 1:
            item["health"] = "degraded" if "serving" in healths else item["health"]
        item["restarts"] = status.restarts if status else None
        item["crash_looping"] = status.crash_looping if status else False
        nodes.append(item)
    return {
        "time": now,
        "summary": asdict(summary),
        "nodes": nodes,
        "edges": with_breaker_details(edges(topology, statuses), details),
        "members": members(report),
        "errors": errors(statuses, now),
        "size": {"width": WIDTH, "height": HEIGHT},
    }


async def mesh_snapshot(topology: Topology, session: aiohttp.ClientSession) -> dict[str, Any]:
    """Ask the whole mesh once (as ``make status`` does) and build the page's model."""
    (statuses, summary, report), details = await asyncio.gather(
        report_once(topology), breaker_details(topology, session)
    )
    return snapshot_json(topology, statuses, summary, report, details, now=time.time())
