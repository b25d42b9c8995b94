"""The launcher's wait for ports held only by TIME-WAIT connections, on a fake clock."""

from __future__ import annotations

import pytest

from services.tools.ports import (
    DEFAULT_TIME_WAIT_WAIT_S,
    RECHECK_INTERVAL_S,
    TIME_WAIT_S,
    PortState,
    PortsUnavailable,
    wait_until_bindable,
)
from tests.unit.fakes import FakeClock

ADDRESSES = {"order-service": "127.0.0.1:40003", "risk-service": "127.0.0.1:40005"}


class Probe:
    """Port states by member, each a list consumed one answer per check (the last repeats)."""

    def __init__(self, answers: dict[str, list[PortState]]) -> None:
        self.answers = answers
        self.checks: list[str] = []

    def __call__(self, name: str, address: str) -> PortState:
        assert address == ADDRESSES[name]
        self.checks.append(name)
        queue = self.answers[name]
        return queue.pop(0) if len(queue) > 1 else queue[0]


def test_a_port_in_time_wait_is_waited_for_until_the_bind_succeeds() -> None:
    clock = FakeClock()
    told: list[list[str]] = []
    probe = Probe(
        {
            "order-service": [PortState.TIME_WAIT, PortState.TIME_WAIT, PortState.FREE],
            "risk-service": [PortState.FREE],
        }
    )

    wait_until_bindable(
        ADDRESSES, probe=probe, on_wait=told.append, clock=clock, sleep=clock.advance
    )

    assert told == [["order-service (127.0.0.1:40003)"]]
    assert probe.checks == ["order-service", "risk-service", "order-service", "order-service"]
    assert clock.now == pytest.approx(1000.0 + 2 * RECHECK_INTERVAL_S)


def test_a_taken_port_is_refused_at_once_naming_the_member() -> None:
    clock = FakeClock()
    probe = Probe({"order-service": [PortState.FREE], "risk-service": [PortState.TAKEN]})

    with pytest.raises(PortsUnavailable, match=r"port already taken for: risk-service \(127"):
        wait_until_bindable(ADDRESSES, probe=probe, clock=clock, sleep=clock.advance)
    assert clock.now == 1000.0


def test_time_wait_that_outlasts_the_wait_is_refused_naming_it() -> None:
    clock = FakeClock()
    probe = Probe({"order-service": [PortState.TIME_WAIT], "risk-service": [PortState.FREE]})

    with pytest.raises(PortsUnavailable, match=r"TIME-WAIT .* order-service"):
        wait_until_bindable(ADDRESSES, timeout_s=5.0, probe=probe, clock=clock, sleep=clock.advance)
    assert clock.now == pytest.approx(1005.0)


def test_the_default_wait_outlasts_linux_time_wait() -> None:
    assert TIME_WAIT_S == 60.0
    assert DEFAULT_TIME_WAIT_WAIT_S > TIME_WAIT_S
