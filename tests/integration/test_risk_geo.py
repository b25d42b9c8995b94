"""risk-service geo-IP lookup against the real sandbox through the policy chain.

Answers are cached per address for a TTL; an outage is neither cached nor raised.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from interceptors.chain import build_client_chain
from interceptors.policy import PolicyConfig
from services.risk.geo import GeoLookup
from services.risk.rules import Geo
from services.tools.sandbox.app import Fault, SandboxState
from tests.servers import running_sandbox

# One attempt, no breaker trips: each lookup is one request the sandbox can count.
POLICY = {"defaults": {"timeout_s": 2.0, "retry": {"max_attempts": 1}}}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sandbox() -> Iterator[tuple[str, SandboxState]]:
    with running_sandbox() as running:
        yield running


def _lookup(address: str, **kwargs: object) -> GeoLookup:
    chain = build_client_chain(caller="risk-service", config=PolicyConfig.from_mapping(POLICY))
    client = chain.http_client("geo-ip", f"http://{address}/geo-ip")
    return GeoLookup(client, **kwargs)  # type: ignore[arg-type]


async def test_answer_is_cached_for_the_ttl(sandbox: tuple[str, SandboxState]) -> None:
    address, state = sandbox
    clock = _Clock()
    lookup = _lookup(address, ttl_s=10, clock=clock)
    first = await lookup.lookup("192.0.2.1")
    assert first.looked_up
    clock.now = 9.9
    assert await lookup.lookup("192.0.2.1") == first
    assert state.requests["geo-ip"] == 1
    clock.now = 10.0
    await lookup.lookup("192.0.2.1")
    assert state.requests["geo-ip"] == 2


async def test_outage_is_an_unlooked_up_geo_and_not_cached(
    sandbox: tuple[str, SandboxState],
) -> None:
    address, state = sandbox
    lookup = _lookup(address, clock=_Clock())
    state.faults["geo-ip"] = Fault(error_rate=1.0, status=503)
    assert await lookup.lookup("192.0.2.1") == Geo(looked_up=False)
    state.faults.clear()
    assert (await lookup.lookup("192.0.2.1")).looked_up


async def test_cache_keeps_at_most_max_entries(sandbox: tuple[str, SandboxState]) -> None:
    address, state = sandbox
    lookup = _lookup(address, max_entries=2, clock=_Clock())
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"):
        await lookup.lookup(ip)
    assert state.requests["geo-ip"] == 4  # the first address was evicted by the third
