"""Fixtures of the integration tests: the test service that fails on command, and a running
order-service that reflection clients (grpcurl, buf curl) talk to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.order.__main__ import build as build_order_service
from tests.integration.harness import RunningServer, serving
from tests.servers import running_service


@pytest.fixture
async def scripted() -> AsyncIterator[RunningServer]:
    """A running ``ScriptedServicer``: script its failures with ``scripted.servicer.fail``."""
    async with serving() as running:
        yield running


@pytest.fixture
async def order_service(tmp_path: Path) -> AsyncIterator[str]:
    """A running order-service (mTLS, reflection on); yields its address."""
    async with running_service(
        "order-service", build_order_service, environ={"PAYMESH_VAR_DIR": str(tmp_path)}
    ) as address:
        yield address
