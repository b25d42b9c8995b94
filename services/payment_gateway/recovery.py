"""Crash recovery: drive every unfinished payment and refund to a terminal status.

A pass runs when the gateway starts and then periodically. It re-runs each flow from its
committed step with the same deterministic downstream ids (the channel dedupes the charge by
its key, so at most one charge exists), completes the request id's claim with the final
response so a client's retry replays it, and resends best-effort effects that failed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.payment_gateway.flow import PaymentFlow, PaymentPending
from services.payment_gateway.store import PaymentStore

log = logging.getLogger("paymesh.payment_gateway.recovery")


@dataclass(slots=True)
class RecoveryReport:
    """What one pass did."""

    finished: int = 0
    """Payments and refunds driven to a terminal status."""
    pending: int = 0
    """Payments and refunds still waiting on a downstream (the next pass retries them)."""
    effects_resent: int = 0
    """Finished payments and refunds whose webhook, event and order status were now sent."""


class Recovery:
    """Runs recovery passes over the gateway's store."""

    def __init__(self, store: PaymentStore, flow: PaymentFlow) -> None:
        self._store = store
        self._flow = flow
        self._lock = asyncio.Lock()

    async def run_once(self) -> RecoveryReport:
        """One pass; flows another task is driving right now are left to that task."""
        report = RecoveryReport()
        async with self._lock:  # two passes at once would drive the same payment twice
            for payment_id in self._store.unfinished_payments():
                if self._flow.is_driving(payment_id):
                    continue
                with self._flow.driving(payment_id):
                    try:
                        await self._flow.run_payment(payment_id, recovering=True)
                        report.finished += 1
                    except PaymentPending as pending:
                        report.pending += 1
                        log.warning("recovery: %s", pending)
                    except Exception:  # one broken payment must not stop the others
                        report.pending += 1
                        log.exception("recovery of payment %s failed", payment_id)
            for refund_id in self._store.unfinished_refunds():
                if self._flow.is_driving(refund_id):
                    continue
                with self._flow.driving(refund_id):
                    try:
                        await self._flow.run_refund(refund_id)
                        report.finished += 1
                    except PaymentPending as pending:
                        report.pending += 1
                        log.warning("recovery: %s", pending)
                    except Exception:  # one broken refund must not stop the others
                        report.pending += 1
                        log.exception("recovery of refund %s failed", refund_id)
            for payment_id in self._store.payments_with_pending_effects():
                if not self._flow.is_driving(payment_id) and await self._flow.send_payment_effects(
                    self._store.payment(payment_id)
                ):
                    report.effects_resent += 1
            for refund_id in self._store.refunds_with_pending_effects():
                if not self._flow.is_driving(refund_id) and await self._flow.send_refund_effects(
                    self._store.refund(refund_id)
                ):
                    report.effects_resent += 1
        if report.finished or report.pending or report.effects_resent:
            log.info("recovery pass: %s", report)
        return report

    async def run_forever(self, interval_s: float) -> None:
        """A pass now, then one every ``interval_s``, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass must not end recovery; the next one retries
                log.exception("recovery pass failed")
            await asyncio.sleep(interval_s)
