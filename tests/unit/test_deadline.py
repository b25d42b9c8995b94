"""Outgoing deadline: min(policy, incoming remaining - margin); fail fast when none is left."""

from __future__ import annotations

import pytest

from interceptors.deadline import (
    DeadlineExhausted,
    OutgoingDeadline,
    bind_call_deadline,
    deadline_is_callers,
    deadline_left,
    outgoing_deadline,
    reset_call_deadline,
    reset_incoming_deadline,
    set_incoming_deadline,
)
from tests.unit.fakes import FakeClock


def test_outside_a_handler_the_policy_timeout_applies() -> None:
    deadline = outgoing_deadline(5.0, margin_s=0.05, clock=FakeClock())
    assert (deadline.timeout_s, deadline.propagated) == (5.0, False)


def test_inside_a_handler_the_incoming_remaining_minus_margin_applies() -> None:
    clock = FakeClock()
    token = set_incoming_deadline(2.0, clock=clock)
    try:
        clock.advance(0.5)
        deadline = outgoing_deadline(5.0, margin_s=0.1, clock=clock)
    finally:
        reset_incoming_deadline(token)
    assert deadline.timeout_s == pytest.approx(1.4)
    assert deadline.propagated


def test_a_shorter_policy_timeout_wins_over_the_incoming_deadline() -> None:
    clock = FakeClock()
    token = set_incoming_deadline(10.0, clock=clock)
    try:
        deadline = outgoing_deadline(1.0, margin_s=0.1, clock=clock)
    finally:
        reset_incoming_deadline(token)
    assert (deadline.timeout_s, deadline.propagated) == (1.0, False)


def test_nothing_left_fails_fast() -> None:
    clock = FakeClock()
    token = set_incoming_deadline(0.05, clock=clock)
    try:
        with pytest.raises(DeadlineExhausted):
            outgoing_deadline(5.0, margin_s=0.05, clock=clock)
    finally:
        reset_incoming_deadline(token)


def test_incoming_deadline_without_bound_leaves_none() -> None:
    token = set_incoming_deadline(None)
    try:
        assert deadline_left() is None
    finally:
        reset_incoming_deadline(token)


def test_a_call_bound_by_the_incoming_deadline_runs_on_its_callers_deadline() -> None:
    clock = FakeClock()
    incoming = set_incoming_deadline(0.08, clock=clock)
    try:
        bound = bind_call_deadline(outgoing_deadline(5.0, margin_s=0.05, clock=clock))
        try:
            assert deadline_is_callers()
        finally:
            reset_call_deadline(bound)
    finally:
        reset_incoming_deadline(incoming)


def test_a_call_bound_by_its_own_timeout_does_not_run_on_its_callers_deadline() -> None:
    clock = FakeClock()
    incoming = set_incoming_deadline(10.0, clock=clock)
    try:
        bound = bind_call_deadline(outgoing_deadline(1.0, margin_s=0.05, clock=clock))
        try:
            assert not deadline_is_callers()
        finally:
            reset_call_deadline(bound)
    finally:
        reset_incoming_deadline(incoming)


def test_outside_an_outgoing_call_no_deadline_is_the_callers() -> None:
    token = bind_call_deadline(OutgoingDeadline(timeout_s=0.03, propagated=True))
    reset_call_deadline(token)
    assert not deadline_is_callers()
