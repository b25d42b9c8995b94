"""Recovery: a loop that drives every unfinished payment and refund to a terminal status.

A pass runs when the gateway starts and then periodically. It re-runs each flow from its
committed step with the same deterministic downstream ids (the channel dedupes the charge by
its key, so at most one charge exists) and completes the request id's claim with the final
response, so a client's retry replays it. It waits for its dependencies rather than racing
them: an item whose next step needs a target whose breaker is open is left until the breaker's
open time has passed, and an item whose downstream failed without an answer is retried with
exponential backoff and jitter. Neither is an error: one summary line per pass says what
changed. Announcements (webhooks, events, order status) are the outbox relay's work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from interceptors.backoff import backoff_delay_s
from interceptors.policy import RetryPolicy
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

log = logging.getLogger("paymesh.payment_gateway.recovery")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverySchedule:
    """How often passes run and how patiently an item that keeps failing is retried."""

    interval_s: float = 30.0
    """Longest pause between two passes (new unfinished items are found by the next one)."""
    initial_backoff_s: float = 1.0
    """Upper bound of the jittered wait after an item's first failed attempt."""
    max_backoff_s: float = 300.0
    """Cap of that bound, however often the item failed."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")


@dataclass(slots=True)
class RecoveryReport:
    """What one pass did."""

    finished: int = 0
    """Payments and refunds driven to a terminal status."""
    abandoned: int = 0
    """Payments past the charge cutoff that never reached the channel, forgotten."""
    pending: int = 0
    """Payments and refunds tried and still waiting on a downstream (retried with backoff)."""
    waiting: int = 0
    """Payments and refunds not tried: their downstream's breaker is open, or their backoff
    has not passed."""


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    due: float = field(default=-math.inf)


class Recovery:
    """Runs recovery passes over the gateway's store."""

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
        self._schedule = schedule or RecoverySchedule()
        self._backoff_policy = RetryPolicy(
            initial_backoff_s=self._schedule.initial_backoff_s,
            max_backoff_s=self._schedule.max_backoff_s,
        )
        self._watch = watch
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._backoff: dict[str, _Backoff] = {}
        self._last = RecoveryReport()

    async def run_once(self) -> RecoveryReport:
        """One pass; flows another task is driving right now are left to that task."""
        report = RecoveryReport()
        async with self._lock:  # two passes at once would drive the same payment twice
            payments = self._store.unfinished_payments()
            refunds = self._store.unfinished_refunds()
            for payment_id in payments:
                try:
                    step = self._store.payment(payment_id).step
                except NotFound:  # a live request abandoned it since the listing
                    continue
                target = STEP_TARGETS.get(step)
                run = functools.partial(self._flow.run_payment, payment_id, recovering=True)
                await self._resume(payment_id, target, run, report)
            for refund_id in refunds:
                target = REFUND_STEP_TARGETS.get(self._store.refund(refund_id).step)
                run_refund = functools.partial(self._flow.run_refund, refund_id)
                await self._resume(refund_id, target, run_refund, report)
            unfinished = {*payments, *refunds}
            for gone in set(self._backoff) - unfinished:
                del self._backoff[gone]
        self._log(report)
        return report

    def next_pass_in_s(self) -> float:
        """Seconds until the next pass is due: the interval, or sooner when a backoff ends."""
        wait = self._schedule.interval_s
        now = self._clock()
        for backoff in self._backoff.values():
            wait = min(wait, backoff.due - now)
        return max(0.0, wait)

    async def run_forever(self) -> None:
        """A pass now, then whenever the next is due, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass must not end recovery; the next one retries
                log.exception("recovery pass failed")
            await self._sleep(self.next_pass_in_s())

    async def _resume(
        self,
        flow_id: str,
        target: str | None,
        run: Callable[[], Awaitable[object]],
        report: RecoveryReport,
    ) -> None:
        if self._flow.is_driving(flow_id):
            return
        backoff = self._backoff.setdefault(flow_id, _Backoff())
        now = self._clock()
        if backoff.due > now:
            report.waiting += 1
            return
        open_left = self._watch.open_left_s(target) if self._watch and target else 0.0
        if open_left > 0:
            # Its dependency is known to be down: no call, no failure counted; try once the
            # breaker lets a trial through.
            backoff.due = now + open_left
            report.waiting += 1
            log.debug("recovery: %s waits %.1f s for %s", flow_id, open_left, target)
            return
        with self._flow.driving(flow_id):
            try:
                await run()
            except PaymentNotStarted as gone:
                report.abandoned += 1
                log.info("recovery: %s", gone)
            except PaymentPending as pending:
                self._failed(backoff)
                report.pending += 1
                log.debug("recovery: %s", pending)
                return
            except Exception:  # one broken item must not stop the others
                self._failed(backoff)
                report.pending += 1
                log.exception("recovery of %s failed", flow_id)
                return
            else:
                report.finished += 1
        del self._backoff[flow_id]

    def _failed(self, backoff: _Backoff) -> None:
        backoff.failures += 1
        delay = backoff_delay_s(self._backoff_policy, backoff.failures, self._rng)
        backoff.due = self._clock() + delay

    def _log(self, report: RecoveryReport) -> None:
        # One line when something changed; a pass that only waits again says it at debug.
        changed = report.finished or report.abandoned or report != self._last
        self._last = report
        if changed and (report.finished or report.abandoned or report.pending or report.waiting):
            log.info("recovery pass: %s", report)
        else:
            log.debug("recovery pass: %s", report)
