"""The Diagnostics overall status and the ``/healthz`` verdict, from given entries and clocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from paymesh.mesh.v1 import mesh_pb2
from services.mesh.diagnostics import (
    HEALTHZ_MAX_LAG_S,
    healthz_max_lag_s,
    overall_status,
    process_health,
)

SERVING = mesh_pb2.DEPENDENCY_HEALTH_SERVING


def _service(
    name: str = "order-service",
    health: mesh_pb2.DependencyHealth.ValueType = SERVING,
    breaker: mesh_pb2.BreakerState.ValueType = mesh_pb2.BREAKER_STATE_CLOSED,
) -> mesh_pb2.Dependency:
    return mesh_pb2.Dependency(
        name=name, kind=mesh_pb2.DEPENDENCY_KIND_GRPC_SERVICE, health=health, breaker_state=breaker
    )


def _database(health: mesh_pb2.DependencyHealth.ValueType = SERVING) -> mesh_pb2.Dependency:
    return mesh_pb2.Dependency(
        name="database", kind=mesh_pb2.DEPENDENCY_KIND_DATABASE, health=health
    )


def test_ready_with_every_dependency_serving_and_closed_is_serving() -> None:
    assert overall_status([_service(), _database()]) == (mesh_pb2.SERVICE_STATUS_SERVING, "")


def test_a_service_without_dependencies_is_serving() -> None:
    assert overall_status([]) == (mesh_pb2.SERVICE_STATUS_SERVING, "")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (_service(health=mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE), "order-service: UNREACHABLE"),
        (_service(breaker=mesh_pb2.BREAKER_STATE_OPEN), "order-service: breaker OPEN"),
        (
            _service(breaker=mesh_pb2.BREAKER_STATE_HALF_OPEN_READY),
            "order-service: breaker HALF-OPEN-READY",
        ),
        (
            _service(
                health=mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING,
                breaker=mesh_pb2.BREAKER_STATE_HALF_OPEN,
            ),
            "order-service: NOT_SERVING, breaker HALF-OPEN",
        ),
    ],
)
def test_a_dependency_down_or_not_closed_degrades_the_service(
    entry: mesh_pb2.Dependency, reason: str
) -> None:
    assert overall_status([entry, _service("risk-service"), _database()]) == (
        mesh_pb2.SERVICE_STATUS_DEGRADED,
        reason,
    )


def test_an_own_database_that_does_not_answer_is_not_serving_whatever_else() -> None:
    entries = [
        _service(health=mesh_pb2.DEPENDENCY_HEALTH_UNREACHABLE),
        _database(mesh_pb2.DEPENDENCY_HEALTH_NOT_SERVING),
    ]

    assert overall_status(entries) == (mesh_pb2.SERVICE_STATUS_NOT_SERVING, "database: NOT_SERVING")


class SteppingClock:
    """Each reading is ``step_s`` later than the one before."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


async def test_healthz_is_ok_with_a_prompt_loop_and_no_database() -> None:
    status, body = await process_health("order-service", database=None, clock=SteppingClock(0.002))

    assert status == 200
    assert (body["status"], body["failed"]) == ("ok", [])
    assert body["checks"]["event_loop"] == {"ok": True, "lag_ms": 2.0, "max_lag_ms": 1000.0}


async def test_healthz_fails_naming_the_event_loop_when_it_lags_past_the_limit() -> None:
    status, body = await process_health(
        "order-service", database=None, max_lag_s=0.5, clock=SteppingClock(0.6)
    )

    assert status == 503
    assert (body["status"], body["failed"]) == ("failing", ["event_loop"])
    assert body["checks"]["event_loop"]["lag_ms"] == 600.0


async def test_healthz_fails_naming_the_database_when_it_does_not_answer(tmp_path: Path) -> None:
    status, body = await process_health("order-service", database=tmp_path / "missing.db")

    assert status == 503
    assert body["failed"] == ["database"]
    assert body["checks"]["database"]["health"] == "NOT_SERVING"
    assert "unable to open" in body["checks"]["database"]["error"]


def test_healthz_lag_limit_defaults_to_a_second_and_reads_the_environment() -> None:
    assert HEALTHZ_MAX_LAG_S == 1.0
    assert healthz_max_lag_s({}) == 1.0
    assert healthz_max_lag_s({"PAYMESH_HEALTHZ_MAX_LAG_S": "0.25"}) == 0.25


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_healthz_lag_limit_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="PAYMESH_HEALTHZ_MAX_LAG_S"):
        healthz_max_lag_s({"PAYMESH_HEALTHZ_MAX_LAG_S": value})
