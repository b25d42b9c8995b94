"""``make status`` asks the mesh through the operator's sync policy chain (the one loop)."""

from __future__ import annotations

from pathlib import Path

from services.mesh.topology import Topology
from services.order.__main__ import build
from services.tools.ports import free_port
from services.tools.status import DOWN, SERVING, service_status, tool_chain
from tests.servers import identity, running_service

TARGET = "order-service"


async def test_status_of_a_service_is_asked_through_the_sync_chain(tmp_path: Path) -> None:
    chain = tool_chain()
    async with running_service(TARGET, build, environ={"PAYMESH_VAR_DIR": str(tmp_path)}) as addr:
        topology = Topology(environ={"ORDER_SERVICE_ADDR": addr})
        status = await service_status(topology, TARGET, identity(), chain)
    assert (status.health, status.error) == (SERVING, "")
    # Liveness, readiness and Diagnostics: three calls, each counted by the chain's observer.
    assert chain.telemetry.value("calls_total", target=TARGET, code="OK") == 3
    assert chain.telemetry.value("attempts_total", target=TARGET) == 3


async def test_a_service_that_does_not_answer_is_down_and_its_checks_are_not_retried() -> None:
    chain = tool_chain()
    topology = Topology(environ={"ORDER_SERVICE_ADDR": f"127.0.0.1:{free_port()}"})
    status = await service_status(topology, TARGET, identity(), chain)
    assert (status.health, status.liveness) == (DOWN, "UNAVAILABLE")
    # Health checks are not declared idempotent: one attempt each, no retry.
    assert chain.telemetry.value("attempts_total", target=TARGET) == 2
    assert chain.telemetry.value("retry_stops_total", target=TARGET, reason="not_retryable") == 2
