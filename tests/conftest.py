"""The shared test harness: a service under test with its stub, and the error-reason helper.

``services`` starts real services through the bootstrap (``tests/servers.py``) in the test's
event loop, wires each to the ones started before it, restarts one on the same data when a
test asks, and closes them when the test ends; ``error_reason`` (imported from
``tests.servers``) reads the ErrorInfo reason of a failed call. The chain's deliberately
failing test service lives in ``tests/integration/harness.py`` (fixture ``scripted`` there).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.servers import ServicesUnderTest, services_under_test


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[ServicesUnderTest]:
    """Services under test, served on 127.0.0.1 port 0 with the test's ``tmp_path`` as var dir."""
    async with services_under_test(tmp_path) as services:
        yield services
