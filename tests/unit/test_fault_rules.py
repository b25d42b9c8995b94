"""Fault rules are bounded: no delay past every deadline, no unbounded rule list."""

from __future__ import annotations

import pytest

from services.mesh.faults import MAX_DELAY_MS, MAX_FAULTS, Fault, FaultInjector


def test_delay_beyond_the_maximum_is_refused() -> None:
    Fault(delay_ms=MAX_DELAY_MS)
    with pytest.raises(ValueError, match="delay_ms"):
        Fault(delay_ms=MAX_DELAY_MS + 1)


def test_more_rules_than_the_maximum_replace_nothing() -> None:
    injector = FaultInjector()
    injector.set([Fault(abort_code="UNAVAILABLE")])
    with pytest.raises(ValueError, match=str(MAX_FAULTS)):
        injector.set([Fault()] * (MAX_FAULTS + 1))
    assert injector.snapshot() == [
        {"method": "*", "delay_ms": 0, "abort_code": "UNAVAILABLE", "rate": 1.0}
    ]
