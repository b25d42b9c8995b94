"""Recovery: the shared recovery loop, configured to finish the gateway's payments and refunds.

The loop (:class:`services.storage.resumable.RecoveryLoop`) runs a pass when the gateway
starts and then periodically. Each pass re-runs every unfinished flow from its committed step
with the same deterministic downstream ids (the channel dedupes the charge by its key, so at
most one charge exists); the flow completes the request id's claim with the final response,
so a client's retry replays it. What is the gateway's own is only configuration: which items
there are (payments, then refunds), the hook that says an item's dependency is down (the
breaker of the target its next step calls: the item is left until the breaker's open time has
passed), per-item exponential backoff with jitter for an item whose downstream failed without
an answer, and what a flow's outcome means (pending, or abandoned past the charge cutoff).
Neither waiting nor pending is an error: one summary line per pass says what changed.
Announcements (webhooks, events, order status) are the outbox relay's work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from services.mesh.errors import NotFound
from services.payment_gateway.dependencies import DependencyWatch
from services.payment_gateway.flow import (
    REFUND_STEP_TARGETS,
    STEP_TARGETS,
    PaymentFlow,
    PaymentNotStarted,
    PaymentPending,
)
from services.payment_gateway.store import PaymentStore
from services.storage.resumable import Outcome, RecoveryLoop, RecoveryReport, RecoverySchedule

__all__ = ["Recovery", "RecoveryReport", "RecoverySchedule"]

log = logging.getLogger("paymesh.payment_gateway.recovery")


@dataclass(frozen=True, slots=True)
class _Item:
    key: str
    """The payment or refund id."""
    refund: bool
    """A refund (else a payment)."""
    target: str | None
    """The downstream its next step calls first."""


class Recovery(RecoveryLoop[_Item]):
    """The recovery loop over the gateway's store and flows."""

    def __init__(
        self,
        store: PaymentStore,
        flow: PaymentFlow,
        *,
        schedule: RecoverySchedule | None = None,
        watch: DependencyWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._flow = flow
        self._watch = watch
        super().__init__(
            unfinished=self._unfinished,
            resume=self._resume_flow,
            log=log,
            what="payments and refunds",
            schedule=schedule,
            busy=flow.is_driving,  # a live request's flow is left to it
            wait_s=self._breaker_open_s if watch is not None else None,
            clock=clock,
            rng=rng,
            sleep=sleep,
        )

    def _unfinished(self) -> Iterator[_Item]:
        # Both listed up front; each step is read just before its item is resumed.
        payments = self._store.unfinished_payments()
        refunds = self._store.unfinished_refunds()
        for payment_id in payments:
            try:
                step = self._store.payment(payment_id).step
            except NotFound:  # a live request abandoned it since the listing
                continue
            yield _Item(payment_id, refund=False, target=STEP_TARGETS.get(step))
        for refund_id in refunds:
            step = self._store.refund(refund_id).step
            yield _Item(refund_id, refund=True, target=REFUND_STEP_TARGETS.get(step))

    def _breaker_open_s(self, item: _Item) -> float:
        if self._watch is None or item.target is None:
            return 0.0
        return self._watch.open_left_s(item.target)

    async def _resume_flow(self, item: _Item) -> Outcome:
        with self._flow.driving(item.key):
            try:
                if item.refund:
                    await self._flow.run_refund(item.key)
                else:
                    await self._flow.run_payment(item.key, recovering=True)
            except PaymentNotStarted as gone:
                log.info("recovery: %s", gone)
                return Outcome.ABANDONED
            except PaymentPending as pending:
                log.debug("recovery: %s", pending)
                return Outcome.PENDING
        return Outcome.FINISHED
