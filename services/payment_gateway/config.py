"""payment-gateway's settings, read once at start from its environment.

``PAYMENT_GATEWAY_RECOVERY_INTERVAL_S`` (default 30): longest pause between recovery passes.
``PAYMENT_GATEWAY_RECOVERY_MAX_BACKOFF_S`` (default 300): cap of the backoff of a payment or
refund whose downstream keeps failing.
``PAYMENT_GATEWAY_CHARGE_CUTOFF_S`` (default 900): recovery never sends a first charge for a
payment older than this; a payment that old with no charge at the channel ends FAILED.
``PAYMENT_GATEWAY_OUTBOX_INTERVAL_S`` (default 5): longest pause of the outbox relay between
two looks at its rows (a commit wakes it at once).
``PAYMENT_GATEWAY_OUTBOX_MAX_BACKOFF_S`` (default 60): cap of the relay's backoff while a
destination keeps failing; it retries forever.
``PAYMENT_GATEWAY_OUTBOX_BATCH_ITEMS`` (default 64, 1-64): most rows of one destination the
relay sends in one batch call; 1 sends each row in a call of its own.
``PAYMENT_GATEWAY_OUTBOX_GATHER_S`` (default 0.05, 0 up to the outbox interval): least time
between two passes of the relay woken by commits, so the rows of the payments committed
meanwhile share one batch call; 0 sends at every commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.mesh.batch import MAX_BATCH_ITEMS
from services.mesh.bootstrap import StartupError
from services.payment_gateway.outbox import RelayPolicy
from services.payment_gateway.recovery import RecoverySchedule

RECOVERY_INTERVAL_VAR = "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S"
RECOVERY_MAX_BACKOFF_VAR = "PAYMENT_GATEWAY_RECOVERY_MAX_BACKOFF_S"
CHARGE_CUTOFF_VAR = "PAYMENT_GATEWAY_CHARGE_CUTOFF_S"
OUTBOX_INTERVAL_VAR = "PAYMENT_GATEWAY_OUTBOX_INTERVAL_S"
OUTBOX_MAX_BACKOFF_VAR = "PAYMENT_GATEWAY_OUTBOX_MAX_BACKOFF_S"
OUTBOX_BATCH_ITEMS_VAR = "PAYMENT_GATEWAY_OUTBOX_BATCH_ITEMS"
OUTBOX_GATHER_VAR = "PAYMENT_GATEWAY_OUTBOX_GATHER_S"
_VARIABLES = {
    "recovery_interval_s": RECOVERY_INTERVAL_VAR,
    "recovery_max_backoff_s": RECOVERY_MAX_BACKOFF_VAR,
    "charge_cutoff_s": CHARGE_CUTOFF_VAR,
    "outbox_interval_s": OUTBOX_INTERVAL_VAR,
    "outbox_max_backoff_s": OUTBOX_MAX_BACKOFF_VAR,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Timing of the gateway's recovery and outbox delivery."""

    recovery_interval_s: float = 30.0
    """Longest pause between two recovery passes (the first runs at start)."""
    recovery_max_backoff_s: float = 300.0
    """Cap of the jittered backoff of an item whose downstream keeps failing."""
    charge_cutoff_s: float = 900.0
    """Age after which recovery no longer sends a first charge for an unfinished payment."""
    outbox_interval_s: float = 5.0
    """Longest pause of the outbox relay between two looks at its rows."""
    outbox_max_backoff_s: float = 60.0
    """Cap of the relay's jittered backoff while a destination keeps failing."""
    outbox_batch_items: int = MAX_BATCH_ITEMS
    """Most rows of one destination the relay sends in one batch call."""
    outbox_gather_s: float = RelayPolicy().gather_s
    """Least time between two passes of the relay woken by commits (0: none)."""

    def __post_init__(self) -> None:
        if not 1 <= self.outbox_batch_items <= MAX_BATCH_ITEMS:
            raise ValueError(
                f"outbox_batch_items must be 1 to {MAX_BATCH_ITEMS}, got {self.outbox_batch_items}"
            )
        if not (math.isfinite(self.outbox_gather_s) and self.outbox_gather_s >= 0):
            raise ValueError(f"outbox_gather_s must be >= 0 seconds, got {self.outbox_gather_s!r}")
        for item in fields(self):
            if item.name in ("outbox_batch_items", "outbox_gather_s"):
                continue
            value = getattr(self, item.name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{item.name} must be a positive number of seconds, got {value!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GatewayConfig:
        """The settings from the environment; StartupError naming the variable if one is bad."""
        values: dict[str, Any] = {}
        if (raw_items := environ.get(OUTBOX_BATCH_ITEMS_VAR)) is not None:
            items = int(raw_items) if raw_items.strip().isdigit() else 0
            if not 1 <= items <= MAX_BATCH_ITEMS:
                raise StartupError(
                    f"{OUTBOX_BATCH_ITEMS_VAR}={raw_items!r}: must be a whole number of rows,"
                    f" 1 to {MAX_BATCH_ITEMS}"
                )
            values["outbox_batch_items"] = items
        for name, var in _VARIABLES.items():
            raw = environ.get(var)
            if raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                raise StartupError(f"{var}={raw!r}: must be a positive number of seconds")
            values[name] = value
        if (raw_gather := environ.get(OUTBOX_GATHER_VAR)) is not None:
            try:
                gather = float(raw_gather)
            except ValueError:
                gather = math.nan
            interval = values.get("outbox_interval_s", RelayPolicy().interval_s)
            if not 0 <= gather <= interval:  # false for nan too
                raise StartupError(
                    f"{OUTBOX_GATHER_VAR}={raw_gather!r}: must be a number of seconds from 0 to"
                    f" the outbox interval ({interval:g})"
                )
            values["outbox_gather_s"] = gather
        return cls(**values)

    def recovery_schedule(self) -> RecoverySchedule:
        """The recovery loop's pacing."""
        return RecoverySchedule(
            interval_s=self.recovery_interval_s,
            initial_backoff_s=min(
                RecoverySchedule().initial_backoff_s, self.recovery_max_backoff_s
            ),
            max_backoff_s=self.recovery_max_backoff_s,
        )

    def relay_policy(self) -> RelayPolicy:
        """The outbox relay's pacing."""
        return RelayPolicy(
            interval_s=self.outbox_interval_s,
            initial_backoff_s=min(RelayPolicy().initial_backoff_s, self.outbox_max_backoff_s),
            max_backoff_s=self.outbox_max_backoff_s,
            batch_items=self.outbox_batch_items,
            gather_s=min(self.outbox_gather_s, self.outbox_interval_s),
        )
