"""``make status`` as text: the summary line first, lines within 120 columns, errors wrapped."""

from __future__ import annotations

import time

import pytest

from services.mesh.topology import SERVICES
from services.tools.status import (
    WIDTH,
    EdgeStatus,
    ServiceStatus,
    render,
    summarize,
    summary_line,
    with_launcher,
)
from services.tools.supervisor import LauncherReport, MemberReport

NOW = 1_700_000_000.0
LONG_ERROR = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:40003: "
    "Failed to connect to remote host: connect: Connection refused (111) " * 4
)


def _edge(name: str, kind: object = "service", **changes: object) -> EdgeStatus:
    values: dict[str, object] = {
        "name": name,
        "kind": kind,
        "target": "127.0.0.1:40003",
        "health": "SERVING",
        "breaker": "closed",
        "recent_calls": 10,
        "error_rate": 0.0,
        "p99_ms": 12,
        "retries_per_s": 0.0,
        "last_error": "",
        "last_error_time": "",
    }
    values.update(changes)
    return EdgeStatus(**values)  # type: ignore[arg-type]  # the fields, by name


def _service(name: str, edges: tuple[EdgeStatus, ...] = (), **changes: object) -> ServiceStatus:
    values: dict[str, object] = {
        "name": name,
        "address": f"127.0.0.1:4{len(name):04d}",
        "health": "SERVING",
        "liveness": "SERVING",
        "readiness": "SERVING",
        "edges": edges,
    }
    values.update(changes)
    return ServiceStatus(**values)  # type: ignore[arg-type]  # the fields, by name


def _worst_case() -> list[ServiceStatus]:
    """Every service with every edge at its widest: failing, open, slow, a long error."""
    statuses = []
    for spec in SERVICES:
        failing: dict[str, object] = {
            "health": "UNREACHABLE",
            "breaker": "HALF-OPEN-READY",
            "error_rate": 1.0,
            "p99_ms": 30_000,
            "retries_per_s": 123.4,
            "last_error": LONG_ERROR,
            "last_error_time": "2023-11-14T22:13:10+00:00",
        }
        edges = (
            *(_edge(target, **failing) for target in spec.calls),
            *(_edge(partner, "partner", **failing) for partner in spec.partners),
            _edge("database", "database", breaker="-", health="NOT_SERVING"),
        )
        statuses.append(
            _service(
                spec.name,
                edges,
                overall="NOT_SERVING",
                restarts=12345,
                last_exit="cannot start: [Errno 2] No such file or directory",
                last_exit_time="2023-11-14T22:13:10+00:00",
                crash_looping=True,
                next_restart_in_s=30.0,
                error=LONG_ERROR,
            )
        )
    return statuses


def test_every_line_fits_120_columns_at_the_widest() -> None:
    statuses = _worst_case()
    report = LauncherReport(
        pid=1,
        started_time=NOW,
        updated_time=NOW,
        heartbeat_s=2.0,
        members=tuple(
            MemberReport(
                name=s.name,
                address=s.address,
                pid=1,
                running=False,
                restarts=1,
                last_exit="exit 2",
                last_exit_code=2,
                last_exit_time=NOW,
                crash_looping=True,
                next_restart_in_s=1.0,
                up_since_time=None,
            )
            for s in statuses
        ),
    )

    text = render(statuses, summarize(statuses, report, "running"), now=NOW)

    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert WIDTH == 120


def test_the_report_starts_with_the_summary_line() -> None:
    statuses = [
        _service(
            "merchant-auth-service",
            (_edge("merchant-service", health="UNREACHABLE", breaker="OPEN"),),
            overall="DEGRADED",
        ),
        _service("merchant-service", health="DOWN", error="health check: UNAVAILABLE"),
    ]
    report = LauncherReport(
        pid=1,
        started_time=NOW,
        updated_time=NOW,
        heartbeat_s=2.0,
        members=(
            MemberReport(
                name="merchant-service",
                address=statuses[1].address,
                pid=7,
                running=False,
                restarts=3,
                last_exit="exit 2",
                last_exit_code=2,
                last_exit_time=NOW,
                crash_looping=True,
                next_restart_in_s=4.0,
                up_since_time=None,
            ),
        ),
    )
    statuses = with_launcher(statuses, report)

    first, header, _, *rows = render(
        statuses, summarize(statuses, report, "running"), now=NOW
    ).splitlines()

    stamp = time.strftime("%H:%M:%S", time.localtime(NOW))
    # With the breaker's name too it would not fit 120 columns: the name goes, the count stays.
    assert first == (
        f"paymesh status at {stamp}: 1/2 serving, 1 open breaker, "
        "1 crash-looping (merchant-service)"
    )
    assert header.split() == [
        "SERVICE", "/", "EDGE", "HEALTH", "BREAKER", "ERRORS", "P99", "RETRY/S", "RESTARTS",
        "LAST", "EXIT",
    ]  # fmt: skip
    assert rows[0].split()[:2] == ["merchant-auth-service", "DEGRADED"]
    assert rows[1].split()[:4] == ["->", "merchant-service", "UNREACHABLE", "OPEN"]
    assert rows[2].split()[:4] == ["merchant-service", "DOWN", "3", "exit"]
    assert rows[3].strip() == "CRASH-LOOPING: last exit exit 2; next restart in 4 s"


def test_the_last_error_is_wrapped_under_its_edge_with_its_time() -> None:
    error_time = NOW - 42
    stamp = time.strftime("%H:%M:%S", time.localtime(error_time))
    iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(error_time))
    edge = _edge("order-service", last_error=LONG_ERROR, last_error_time=iso)

    lines = render([_service("payment-gateway", (edge,))], now=NOW).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  -> order-service"))
    notes = lines[at + 1 :]

    assert notes[0].startswith(f"        last error at {stamp} (42 s ago): failed to connect")
    assert len(notes) == 2 and notes[1].endswith(" ...")
    assert all(len(line) <= WIDTH for line in notes)


def test_the_summary_names_open_breakers_when_they_fit() -> None:
    statuses = [_service("risk-service", (_edge("geo-ip", "partner", breaker="HALF-OPEN"),))]

    line = summary_line(summarize(statuses, None, "running"), "12:00:00")

    assert line == (
        "paymesh status at 12:00:00: 1/1 serving, 1 open breaker (risk-service -> geo-ip), "
        "0 crash-looping"
    )


def test_a_long_summary_drops_breaker_names_before_crash_looping_ones() -> None:
    statuses = [
        _service(
            spec.name,
            tuple(_edge(t, breaker="OPEN") for t in spec.calls),
        )
        for spec in SERVICES
    ]
    summary = summarize(statuses, None, "running")
    summary = type(summary)(
        services=summary.services,
        serving=summary.serving,
        open_breakers=summary.open_breakers,
        crash_looping=("order-service", "risk-service"),
        launcher="running",
    )

    line = summary_line(summary, "12:00:00")

    assert len(line) <= WIDTH
    assert f"{len(summary.open_breakers)} open breakers," in line
    assert line.endswith("2 crash-looping (order-service, risk-service)")


@pytest.mark.parametrize(
    ("launcher", "said"),
    [
        ("none", "restarts: unknown, no launcher.json"),
        ("stale", "restarts: unknown, launcher.json is stale"),
        ("unreadable", "restarts: unknown, launcher.json is unreadable"),
        ("running", "SERVICE / EDGE"),  # no note: the header follows at once
    ],
)
def test_the_line_under_the_summary_says_when_no_launcher_reports_restarts(
    launcher: str, said: str
) -> None:
    statuses = [_service("order-service")]

    second = render(statuses, summarize(statuses, None, launcher), now=NOW).splitlines()[1]

    assert second.startswith(said)


def test_restarts_apply_only_to_the_member_at_the_address_asked() -> None:
    statuses = [_service("order-service"), _service("risk-service")]
    members = tuple(
        MemberReport(
            name=name,
            address=address,
            pid=7,
            running=True,
            restarts=2,
            last_exit="SIGKILL",
            last_exit_code=-9,
            last_exit_time=NOW,
            crash_looping=False,
            next_restart_in_s=None,
            up_since_time=NOW,
        )
        for name, address in (
            ("order-service", statuses[0].address),
            ("risk-service", "127.0.0.1:1"),  # another mesh's risk-service
        )
    )
    report = LauncherReport(
        pid=1, started_time=NOW, updated_time=NOW, heartbeat_s=2.0, members=members
    )

    order, risk = with_launcher(statuses, report)

    assert (order.restarts, order.last_exit) == (2, "SIGKILL")
    assert order.last_exit_time == "2023-11-14T22:13:20+00:00"
    assert (risk.restarts, risk.last_exit) == (None, "")
