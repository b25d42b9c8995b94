"""channel-adapter settings, read once at start from the environment."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.bootstrap import StartupError

RATE_TTL_VAR = "CHANNEL_ADAPTER_RATE_TTL_S"
DEFAULT_RATE_TTL_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterConfig:
    """What can be tuned per deployment."""

    rate_ttl_s: float = DEFAULT_RATE_TTL_S
    """How long a fetched exchange rate is served from the in-process cache."""

    def __post_init__(self) -> None:
        if not self.rate_ttl_s >= 0:
            raise ValueError(f"rate_ttl_s must be zero or more, got {self.rate_ttl_s}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> AdapterConfig:
        """The settings from ``environ``; StartupError naming the variable when bad."""
        raw = environ.get(RATE_TTL_VAR)
        if raw is None:
            return cls()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise StartupError(
                f"{RATE_TTL_VAR}={raw!r}: must be a number of seconds >= 0"
                f" (default {DEFAULT_RATE_TTL_S:g})"
            )
        return cls(rate_ttl_s=value)
