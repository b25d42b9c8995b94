"""Which downstreams the gateway knows to be down, read from its client chain's breakers.

A target is down while its breaker is ``open`` with open time left. ``half-open`` and
``half-open-ready`` (open, its open time passed) are not down: the next call is the trial
that finds the target back. CreatePayment's precheck refuses on a down dependency before
the gate authenticates the merchant and before anything is written; recovery leaves the
items whose next step needs a down target until its open time has passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from interceptors.breaker import OPEN, BreakerRegistry
from interceptors.errors import CIRCUIT_OPEN_REASON
from services.mesh.errors import Unavailable
from services.mesh.topology import Target

#: Every service a CreatePayment needs to succeed: the gate's key check, then the flow's steps.
#: Webhooks and analytics are not among them: the outbox delivers those later.
CREATE_PAYMENT_NEEDS = (
    Target.MERCHANT_AUTH,
    Target.RISK,
    Target.ORDER,
    Target.CHANNEL_ADAPTER,
    Target.ACCOUNTING,
)
#: Every service a RefundPayment needs to succeed.
REFUND_PAYMENT_NEEDS = (Target.MERCHANT_AUTH, Target.CHANNEL_ADAPTER, Target.ACCOUNTING)


@dataclass(frozen=True, slots=True)
class DownTarget:
    """A target whose breaker is open."""

    target: str
    """Its mesh name."""
    open_left_s: float
    """Seconds until its breaker admits a trial call."""


class DependencyWatch:
    """Reads the breakers of one process's client chain (never makes a breaker or a call)."""

    def __init__(self, breakers: BreakerRegistry) -> None:
        self._breakers = breakers

    def down(self, targets: Iterable[str]) -> DownTarget | None:
        """The one of ``targets`` whose breaker stays open longest, None if none is open."""
        wanted = set(targets)
        found: DownTarget | None = None
        for target, readout in self._breakers.readouts().items():
            if target not in wanted or readout.state != OPEN or readout.open_left_s <= 0:
                continue
            if found is None or readout.open_left_s > found.open_left_s:
                found = DownTarget(target, readout.open_left_s)
        return found

    def open_left_s(self, target: str) -> float:
        """Seconds ``target``'s breaker stays open; 0 when it would admit a call."""
        down = self.down((target,))
        return 0.0 if down is None else down.open_left_s

    def refuse_if_down(self, targets: Iterable[str], *, action: str) -> None:
        """Fail fast when one of ``targets`` is down.

        Raises:
            Unavailable: CIRCUIT_OPEN naming the target, RetryInfo its breaker's open time left.
        """
        down = self.down(targets)
        if down is None:
            return
        raise Unavailable(
            f"{action} refused before any work: the circuit breaker of {down.target} is open;"
            f" nothing was written or charged, retry in {down.open_left_s:.1f} s",
            reason=CIRCUIT_OPEN_REASON,
            retry_delay_s=down.open_left_s,
            metadata={"target": down.target},
        )
