"""payment-gateway's settings, read once at start from its environment.

``PAYMENT_GATEWAY_RECOVERY_INTERVAL_S`` (default 30): pause between recovery passes.
``PAYMENT_GATEWAY_CHARGE_CUTOFF_S`` (default 900): recovery never sends a first charge for a
payment older than this; a payment that old with no charge at the channel ends FAILED.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.bootstrap import StartupError

RECOVERY_INTERVAL_VAR = "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S"
CHARGE_CUTOFF_VAR = "PAYMENT_GATEWAY_CHARGE_CUTOFF_S"


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Timing of the gateway's crash recovery."""

    recovery_interval_s: float = 30.0
    """Pause between two recovery passes (the first runs at start)."""
    charge_cutoff_s: float = 900.0
    """Age after which recovery no longer sends a first charge for an unfinished payment."""

    def __post_init__(self) -> None:
        for name in ("recovery_interval_s", "charge_cutoff_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GatewayConfig:
        """The settings from the environment; StartupError naming the variable if one is bad."""
        values: dict[str, float] = {}
        for var, name in (
            (RECOVERY_INTERVAL_VAR, "recovery_interval_s"),
            (CHARGE_CUTOFF_VAR, "charge_cutoff_s"),
        ):
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
        return cls(**values)
