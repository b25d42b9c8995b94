"""merchant-auth-service's settings, read from the environment once at start."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.merchant_auth.limits import MINIMA, VerificationLimits
from services.merchant_auth.pepper import PEPPER_FILE_VAR
from services.mesh.bootstrap import StartupError, seconds_var

STALE_VAR = "MERCHANT_AUTH_SERVICE_MERCHANT_STALE_S"
DEFAULT_STALE_S = 30.0
#: Seconds an authentication may answer from merchant-service's last word without asking
#: again: the bound within which a suspension (or reactivation) reaches authentication.
CACHE_VAR = "MERCHANT_AUTH_SERVICE_MERCHANT_CACHE_S"
DEFAULT_CACHE_S = 5.0
#: Seconds a verified key stays in the shared cache (only with REDIS_URL); zero: not cached.
VERIFIED_KEY_CACHE_VAR = "MERCHANT_AUTH_SERVICE_VERIFIED_KEY_CACHE_S"
DEFAULT_VERIFIED_KEY_CACHE_S = 30.0
#: The environment variable of each VerificationLimits field an operator may set.
LIMIT_VARS = {
    "max_in_flight": "MERCHANT_AUTH_SERVICE_MAX_VERIFICATIONS_IN_FLIGHT",
    "overload_retry_s": "MERCHANT_AUTH_SERVICE_OVERLOAD_RETRY_S",
    "key_failures": "MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT",
    "peer_failures": "MERCHANT_AUTH_SERVICE_PEER_FAILURE_LIMIT",
    "window_s": "MERCHANT_AUTH_SERVICE_FAILURE_WINDOW_S",
    "known_peer_s": "MERCHANT_AUTH_SERVICE_KNOWN_PEER_S",
    "max_tracked": "MERCHANT_AUTH_SERVICE_MAX_TRACKED",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Outage tolerance, where the key pepper comes from, and the verification limits."""

    merchant_stale_s: float = DEFAULT_STALE_S
    """Seconds a remembered merchant answer may stand in while merchant-service is down."""
    merchant_cache_s: float = DEFAULT_CACHE_S
    """Seconds an authentication answers from the remembered merchant without asking; never
    more than ``merchant_stale_s`` (the memory is not kept longer than that)."""
    verified_key_cache_s: float = DEFAULT_VERIFIED_KEY_CACHE_S
    """Seconds a verified key is answered from Redis without the database (REDIS_URL only);
    a revocation deletes the entry at once."""
    pepper_file: Path | None = None
    """File holding the key pepper; ``None``: the one generated in the var directory."""
    limits: VerificationLimits = field(default_factory=VerificationLimits)
    """Concurrency and failure limits of AuthenticateApiKey."""

    def __post_init__(self) -> None:
        if self.merchant_stale_s < 0:
            raise StartupError(f"{STALE_VAR} must be zero or more, got {self.merchant_stale_s}")
        if self.merchant_cache_s < 0:
            raise StartupError(f"{CACHE_VAR} must be zero or more, got {self.merchant_cache_s}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> AuthConfig:
        """The settings in ``environ``, defaults for those not set; StartupError if invalid."""
        pepper = environ.get(PEPPER_FILE_VAR)
        if pepper is not None and not pepper.strip():
            raise StartupError(f"{PEPPER_FILE_VAR} is set but empty; unset it or name a file")
        return cls(
            merchant_stale_s=seconds_var(environ, STALE_VAR, DEFAULT_STALE_S, allow_zero=True),
            merchant_cache_s=seconds_var(environ, CACHE_VAR, DEFAULT_CACHE_S, allow_zero=True),
            verified_key_cache_s=seconds_var(
                environ, VERIFIED_KEY_CACHE_VAR, DEFAULT_VERIFIED_KEY_CACHE_S, allow_zero=True
            ),
            pepper_file=Path(pepper) if pepper else None,
            limits=_limits(environ),
        )


def _limits(environ: Mapping[str, str]) -> VerificationLimits:
    defaults = VerificationLimits()
    values: dict[str, float] = {}
    for name, variable in LIMIT_VARS.items():
        text = environ.get(variable)
        if text is None:
            continue
        default = getattr(defaults, name)
        kind = "an integer" if isinstance(default, int) else "a number"
        try:
            value = int(text) if isinstance(default, int) else float(text)
        except ValueError as exc:
            raise StartupError(
                f"{variable}={text!r} is not {kind} of at least {MINIMA[name]:g}"
                f" (default {default:g})"
            ) from exc
        if not (math.isfinite(value) and value >= MINIMA[name]):  # also refuses nan and inf
            raise StartupError(
                f"{variable}={text!r}: must be {kind} of at least {MINIMA[name]:g}"
                f" (default {default:g})"
            )
        values[name] = value
    return dataclasses.replace(defaults, **values)  # type: ignore[arg-type]  # keys are fields
