"""The shared test harness: a service under test with its stub, the databases, the error reason.

``services`` starts real services through the bootstrap (``tests/servers.py``) in the test's
event loop, wires each to the ones started before it, restarts one on the same data when a
test asks, and closes them when the test ends; ``error_reason`` (imported from
``tests.servers``) reads the ErrorInfo reason of a failed call. The chain's deliberately
failing test service lives in ``tests/integration/harness.py`` (fixture ``scripted`` there).
``redis_server`` is one local redis-server for the session (skipped where it is missing);
``redis_environ`` gives a test ``REDIS_URL`` and a key prefix of its own on it.

A test that takes ``engine`` runs once per store engine, SQLite and PostgreSQL: its
``database_target`` names a fresh database of that engine, and its ``services`` run on one
(a fresh PostgreSQL database per test, one schema per service, through ``DATABASE_URL``);
``PAYMESH_TEST_ENGINE=postgresql`` puts every test's ``services`` on PostgreSQL.
PostgreSQL is one local cluster per test session (``services/tools/postgres.py``); without
its binaries the PostgreSQL runs are skipped with a message saying so.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from services.mesh.bootstrap import SHARED_DATABASE_VAR
from services.storage import engines
from services.storage.shared_state import KEY_PREFIX_VAR, REDIS_URL_VAR
from services.storage.sql import Target
from services.tools import postgres
from services.tools import redis_server as redis_tool
from tests.servers import ServicesUnderTest, services_under_test

#: Runs every ``services`` test on this engine (``postgresql``); ``sqlite`` by default.
TEST_ENGINE_VAR = "PAYMESH_TEST_ENGINE"
#: The store engines a test taking ``engine`` runs on.
ENGINES = ("sqlite", "postgresql")
_fresh = itertools.count(1)


def fresh_name(prefix: str) -> str:
    """A database or schema name no other test of this run has."""
    return f"{prefix}_{os.getpid()}_{next(_fresh)}"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.LocalCluster]:
    """One local PostgreSQL cluster for the whole run (fsync off, a port below 32768)."""
    if postgres.bin_dir() is None:
        pytest.skip(
            "PostgreSQL binaries not found (apt-get install postgresql, or set"
            f" {postgres.BIN_DIR_VAR}): the PostgreSQL engine tests are skipped"
        )
    directory = postgres.temporary_directory()
    try:
        cluster = postgres.LocalCluster(directory)
        cluster.start()
    except postgres.PostgresUnavailable as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"PostgreSQL would not start here ({exc}): its engine tests are skipped")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_database(postgres_cluster: postgres.LocalCluster) -> str:
    """The URL of one database of the run's cluster; tests take fresh schemas in it."""
    return postgres_cluster.create_database("paymesh_tests")


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
def postgres_url(postgres_database: str) -> str:
    """A fresh schema of the run's PostgreSQL database (created by the first store opening it)."""
    return engines.with_schema(postgres_database, fresh_name("t"))


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The store engine this run of the test uses."""
    name: str = request.param
    if name == "postgresql":
        request.getfixturevalue("postgres_cluster")  # skips when PostgreSQL is missing
    return name


@pytest.fixture
def database_target(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[str], Target]:
    """Where a store of this test keeps database ``name``: a file, or a fresh schema."""
    if engine == "sqlite":
        return lambda name: tmp_path / f"{name}.db"
    base: str = request.getfixturevalue("postgres_database")
    prefix = fresh_name("t")
    return lambda name: engines.with_schema(base, f"{prefix}_{name}")


@pytest.fixture
async def services(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ServicesUnderTest]:
    """Services under test, served on 127.0.0.1 port 0 with the test's ``tmp_path`` as var dir.

    In a test that takes ``engine`` (or with ``PAYMESH_TEST_ENGINE=postgresql``), on
    PostgreSQL their stores share a fresh database.
    """
    environ: dict[str, str] = {}
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
    else:
        engine = os.environ.get(TEST_ENGINE_VAR, "sqlite")
    if engine == "postgresql":
        cluster: postgres.LocalCluster = request.getfixturevalue("postgres_cluster")
        environ[SHARED_DATABASE_VAR] = cluster.create_database(fresh_name("mesh"))
    async with services_under_test(tmp_path, environ=environ) as services:
        yield services
