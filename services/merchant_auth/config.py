"""merchant-auth-service's settings, read from the environment once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.bootstrap import StartupError

STALE_VAR = "MERCHANT_AUTH_SERVICE_MERCHANT_STALE_S"
SCRYPT_N_VAR = "MERCHANT_AUTH_SERVICE_SCRYPT_N"
DEFAULT_STALE_S = 30.0
DEFAULT_SCRYPT_N = 2**14


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """How long a merchant's status may be reused in an outage, and the key hashing cost."""

    merchant_stale_s: float = DEFAULT_STALE_S
    """Seconds a remembered merchant answer may stand in while merchant-service is down."""
    scrypt_n: int = DEFAULT_SCRYPT_N
    """scrypt CPU/memory cost of newly issued keys (a power of two)."""

    def __post_init__(self) -> None:
        if self.merchant_stale_s < 0:
            raise StartupError(f"{STALE_VAR} must be zero or more, got {self.merchant_stale_s}")
        if self.scrypt_n < 2 or self.scrypt_n & (self.scrypt_n - 1):
            raise StartupError(f"{SCRYPT_N_VAR} must be a power of two, got {self.scrypt_n}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> AuthConfig:
        """The settings in ``environ``, defaults for those not set; StartupError if invalid."""
        try:
            stale = float(environ.get(STALE_VAR, DEFAULT_STALE_S))
        except ValueError as exc:
            raise StartupError(f"{STALE_VAR}={environ[STALE_VAR]!r} is not a number") from exc
        try:
            cost = int(environ.get(SCRYPT_N_VAR, DEFAULT_SCRYPT_N))
        except ValueError as exc:
            raise StartupError(
                f"{SCRYPT_N_VAR}={environ[SCRYPT_N_VAR]!r} is not an integer"
            ) from exc
        return cls(merchant_stale_s=stale, scrypt_n=cost)
