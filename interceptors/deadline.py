"""Deadline vocabulary: the incoming call's deadline, captured per handler, and what is left.

The server interceptor stores the incoming deadline (absolute, on the monotonic clock) in a
contextvar; client calls made inside that handler read it to propagate the budget, because
grpcio for Python does not propagate deadlines by itself. An outgoing call's timeout is
``min(policy or caller timeout, incoming remaining - margin)``, and one with nothing left is
refused before it is sent. Which bound won is kept for the call in progress, so the breaker
can tell a slow target from a caller in a hurry. No gRPC import here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass

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


class DeadlineExhausted(Exception):
    """Nothing is left of the incoming deadline for an outgoing call; nothing was sent."""

    def __init__(self, left_s: float, margin_s: float) -> None:
        super().__init__(
            f"incoming deadline leaves {left_s * 1000:.0f} ms, under the {margin_s * 1000:.0f} ms "
            "margin: the call was not sent"
        )
        self.left_s = left_s
        self.margin_s = margin_s


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingDeadline:
    """The one overall deadline of an outgoing call and all its retries."""

    timeout_s: float
    """Seconds from now until it ends."""
    propagated: bool
    """Whether the incoming call's deadline, not the call's own timeout (explicit or policy's),
    set it: it was the shorter bound."""


def outgoing_deadline(
    timeout_s: float, *, margin_s: float, clock: Clock = time.monotonic
) -> OutgoingDeadline:
    """``min(timeout_s, incoming remaining - margin_s)``; DeadlineExhausted when nothing is left.

    Args:
        timeout_s: The caller's explicit timeout, else the policy's.
        margin_s: Kept back from the incoming deadline so the handler can still answer.
        clock: Monotonic clock the incoming deadline was recorded on.
    """
    deadline = _incoming_deadline.get()
    if deadline is None:
        return OutgoingDeadline(timeout_s=timeout_s, propagated=False)
    left = max(0.0, deadline - clock())
    inherited = left - margin_s
    if inherited <= 0:
        raise DeadlineExhausted(left, margin_s)
    if inherited < timeout_s:
        return OutgoingDeadline(timeout_s=inherited, propagated=True)
    return OutgoingDeadline(timeout_s=timeout_s, propagated=False)


def within_incoming(
    own: OutgoingDeadline, *, margin_s: float, clock: Clock = time.monotonic
) -> OutgoingDeadline:
    """:func:`outgoing_deadline` of ``own.timeout_s``, with ``own`` itself (not propagated)
    whenever it is the bound: no incoming deadline (one contextvar read), or a longer one.

    Raises:
        DeadlineExhausted: nothing is left of the incoming deadline.
    """
    deadline = _incoming_deadline.get()
    if deadline is None:
        return own
    left = max(0.0, deadline - clock())
    inherited = left - margin_s
    if inherited <= 0:
        raise DeadlineExhausted(left, margin_s)
    if inherited < own.timeout_s:
        return OutgoingDeadline(timeout_s=inherited, propagated=True)
    return own


#: The deadline of the outgoing call whose inner layers (retry, breaker) are running.
_call_deadline: ContextVar[OutgoingDeadline | None] = ContextVar(
    "paymesh_call_deadline", default=None
)


def bind_call_deadline(deadline: OutgoingDeadline) -> Token[OutgoingDeadline | None]:
    """Record the deadline the deadline layer gave the outgoing call its inner layers run for."""
    return _call_deadline.set(deadline)


def reset_call_deadline(token: Token[OutgoingDeadline | None]) -> None:
    """Forget the deadline recorded by :func:`bind_call_deadline`."""
    _call_deadline.reset(token)


def deadline_is_callers() -> bool:
    """Whether the outgoing call in progress runs on its caller's propagated deadline.

    True when the incoming deadline, not the call's own timeout, bounds it: a
    DEADLINE_EXCEEDED then says the caller was in a hurry, not that the target is slow, and
    anyone calling us could otherwise trip our breakers by sending short deadlines.
    """
    deadline = _call_deadline.get()
    return deadline is not None and deadline.propagated
