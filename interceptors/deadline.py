"""Deadline vocabulary: the incoming call's deadline, captured per handler, and what is left.

The server interceptor stores the incoming deadline (absolute, on the monotonic clock) in a
contextvar; client calls made inside that handler read it to propagate the budget, because
grpcio for Python does not propagate deadlines by itself. No gRPC import here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar, Token

Clock = Callable[[], float]

_incoming_deadline: ContextVar[float | None] = ContextVar("paymesh_incoming_deadline", default=None)


def set_incoming_deadline(
    time_remaining_s: float | None, *, clock: Clock = time.monotonic
) -> Token[float | None]:
    """Record the handler's incoming deadline; ``None`` when the caller set none."""
    absolute = None if time_remaining_s is None else clock() + time_remaining_s
    return _incoming_deadline.set(absolute)


def reset_incoming_deadline(token: Token[float | None]) -> None:
    """Forget the deadline recorded by :func:`set_incoming_deadline`."""
    _incoming_deadline.reset(token)


def incoming_deadline() -> float | None:
    """Absolute monotonic deadline of the call being handled, or ``None`` outside one."""
    return _incoming_deadline.get()


def deadline_left(*, clock: Clock = time.monotonic) -> float | None:
    """Seconds left of the incoming call's deadline (never negative), ``None`` if unbounded."""
    deadline = _incoming_deadline.get()
    if deadline is None:
        return None
    return max(0.0, deadline - clock())
