"""The shared test harness: a service under test with its stub, and the error-reason helper.

``services`` starts real services through the bootstrap (``tests/servers.py``) in the test's
event loop, wires each to the ones started before it, restarts one on the same data when a
test asks, and closes them when the test ends; ``error_reason`` (imported from
``tests.servers``) reads the ErrorInfo reason of a failed call. The chain's deliberately
failing test service lives in ``tests/integration/harness.py`` (fixture ``scripted`` there).
``redis_server`` is one local redis-server for the session (skipped where it is missing);
``redis_environ`` gives a test ``REDIS_URL`` and a key prefix of its own on it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.storage.shared_state import KEY_PREFIX_VAR, REDIS_URL_VAR
from services.tools import redis_server as redis_tool
from tests.servers import ServicesUnderTest, services_under_test

_prefixes = itertools.count()


def require_redis_server() -> None:
    """Skip the test, saying why, when Debian's redis-server is not installed."""
    if redis_tool.binary() is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis_tool.RedisServer]:
    """One in-memory redis-server for the session on a free port below 32768."""
    require_redis_server()
    with redis_tool.RedisServer() as server:
        yield server


@pytest.fixture
def redis_environ(redis_server: redis_tool.RedisServer) -> dict[str, str]:
    """``REDIS_URL`` of the session's Redis with a key prefix no other test uses."""
    return {REDIS_URL_VAR: redis_server.url, KEY_PREFIX_VAR: f"test{next(_prefixes)}"}


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[ServicesUnderTest]:
    """Services under test, served on 127.0.0.1 port 0 with the test's ``tmp_path`` as var dir."""
    async with services_under_test(tmp_path) as services:
        yield services
