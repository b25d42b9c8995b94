"""channel-adapter settings, read once at start from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.bootstrap import seconds_var

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
        return cls(
            rate_ttl_s=seconds_var(environ, RATE_TTL_VAR, DEFAULT_RATE_TTL_S, allow_zero=True)
        )
