"""The order lifecycle: which status an order may move to from the one it has.

CREATED ends PAID or CANCELLED; a PAID order may be refunded, partly (again and again) or
wholly; CANCELLED and REFUNDED are final. Asking for the status an order already has is a
no-op, so a resent update is harmless. Pure rules, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from interceptors.errors import Reason
from paymesh.order.v1 import order_pb2
from services.mesh.errors import FailedPrecondition

Status: TypeAlias = order_pb2.OrderStatus.ValueType

#: The statuses each status may move to (besides itself).
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    order_pb2.ORDER_STATUS_CREATED: frozenset(
        {order_pb2.ORDER_STATUS_PAID, order_pb2.ORDER_STATUS_CANCELLED}
    ),
    order_pb2.ORDER_STATUS_PAID: frozenset(
        {order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED, order_pb2.ORDER_STATUS_REFUNDED}
    ),
    order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED: frozenset(
        {order_pb2.ORDER_STATUS_PARTIALLY_REFUNDED, order_pb2.ORDER_STATUS_REFUNDED}
    ),
    order_pb2.ORDER_STATUS_CANCELLED: frozenset(),
    order_pb2.ORDER_STATUS_REFUNDED: frozenset(),
}


def _name(status: Status) -> str:
    return order_pb2.OrderStatus.Name(status).removeprefix("ORDER_STATUS_")


def may_move(current: Status, new: Status) -> bool:
    """Whether an order in ``current`` may be set to ``new`` (itself always)."""
    return new == current or new in TRANSITIONS.get(current, frozenset())


def require_transition(order_id: str, current: Status, new: Status) -> None:
    """Refuse a status change the lifecycle does not allow.

    Raises:
        FailedPrecondition: INVALID_STATE, naming both statuses and what ``current`` allows.
    """
    if may_move(current, new):
        return
    allowed = sorted(_name(s) for s in TRANSITIONS.get(current, frozenset()))
    raise FailedPrecondition(
        f"order {order_id!r} is {_name(current)} and cannot become {_name(new)}; "
        + (f"it may become {', '.join(allowed)}" if allowed else "that status is final"),
        reason=Reason.INVALID_STATE,
        metadata={
            "order_id": order_id,
            "status": _name(current),
            "requested_status": _name(new),
        },
    )
