"""Batch RPCs: many single requests in one call, one result per item, no item failing another.

A batch RPC carries ``repeated`` single requests (at most :data:`MAX_BATCH_ITEMS`). Each item
is checked and applied exactly as its single RPC would be, and the single RPC is a batch of
one (:meth:`ItemOutcome.unwrap`), so the two cannot drift apart. An item's domain error becomes
its own ``BatchItemStatus``, the google.rpc.Status its single call would have failed with;
a caller reads it back as the typed error that call would have raised (:func:`item_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.rpc import status_pb2
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, CallError, status_code
from paymesh.common.v1 import common_pb2
from services.mesh import validation as v
from services.mesh.errors import ServiceError, service_error_status

#: Most items one batch call may carry (the contract's bound, ``paymesh/common/v1``).
MAX_BATCH_ITEMS = 64

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class ItemOutcome(Generic[ResponseT]):
    """What became of one item: its response (applied now or replayed) or its error."""

    response: ResponseT | None = None
    """The single RPC's response; None when the item failed."""
    duplicate: bool = False
    """The request id was applied before with the same body: ``response`` is the first one."""
    error: ServiceError | None = None
    """Why the item was not applied (nothing of it was written)."""

    def unwrap(self) -> ResponseT:
        """The response, or the item's error raised: the single RPC's answer."""
        if self.error is not None:
            raise self.error
        assert self.response is not None  # an outcome is a response or an error
        return self.response


def require_items(field: str, items: Sequence[object]) -> None:
    """Refuse a batch of no items or of more than :data:`MAX_BATCH_ITEMS`, before any is applied."""
    if not items:
        raise v.invalid(field, "must hold at least one item")
    if len(items) > MAX_BATCH_ITEMS:
        raise v.invalid(field, f"holds {len(items)} items; at most {MAX_BATCH_ITEMS} per call")


def apply_each(
    requests: Sequence[RequestT],
    check: Callable[[RequestT], object],
    apply: Callable[[Sequence[RequestT]], Sequence[ItemOutcome[ResponseT]]],
) -> list[ItemOutcome[ResponseT]]:
    """Check each request, apply the valid ones together; outcomes in the requests' order.

    ``check`` raises a :class:`ServiceError` for a bad request (that item fails, the others go
    on); ``apply`` returns one outcome per request it is given, in order.
    """
    checked: list[ItemOutcome[ResponseT] | None] = []
    valid: list[RequestT] = []
    for request in requests:
        try:
            check(request)
        except ServiceError as exc:
            checked.append(ItemOutcome(error=exc))
        else:
            checked.append(None)
            valid.append(request)
    applied = iter(apply(valid) if valid else ())
    return [outcome if outcome is not None else next(applied) for outcome in checked]


def item_status(error: ServiceError, *, domain: str) -> common_pb2.BatchItemStatus:
    """The BatchItemStatus of an item's error: the status its single call would carry."""
    status = service_error_status(error, domain=domain)
    # BatchItemStatus has google.rpc.Status's fields and numbers: its bytes are one.
    return common_pb2.BatchItemStatus.FromString(status.SerializeToString())


def results(
    result_type: Callable[..., ResultT],
    outcomes: Sequence[ItemOutcome[Any]],
    *,
    domain: str,
) -> list[ResultT]:
    """One ``XxxResult`` (``outcome``, ``response``, ``error``) per outcome, in order."""
    found: list[ResultT] = []
    for outcome in outcomes:
        if outcome.error is not None:
            found.append(
                result_type(
                    outcome=common_pb2.BATCH_ITEM_OUTCOME_FAILED,
                    error=item_status(outcome.error, domain=domain),
                )
            )
        else:
            found.append(
                result_type(
                    outcome=common_pb2.BATCH_ITEM_OUTCOME_DUPLICATE
                    if outcome.duplicate
                    else common_pb2.BATCH_ITEM_OUTCOME_APPLIED,
                    response=outcome.response,
                )
            )
    return found


def item_error(status: common_pb2.BatchItemStatus, *, target: str, method: str) -> CallError:
    """The typed error a failed item's status is (the caller's side): what its single call
    would have raised, with the callee's ErrorInfo and details."""
    code = status_code(status_pb2.Status.FromString(status.SerializeToString()))
    return CallError(
        code,
        status.message,
        target=target,
        method=method,
        attempts=1,
        stop_reason="not_retryable",
        trailing_metadata=aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString())),
    )
