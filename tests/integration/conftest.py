"""Fixtures of the chain's integration tests: the test service that fails on command."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.harness import RunningServer, serving


@pytest.fixture
async def scripted() -> AsyncIterator[RunningServer]:
    """A running ``ScriptedServicer``: script its failures with ``scripted.servicer.fail``."""
    async with serving() as running:
        yield running
