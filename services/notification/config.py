"""notification-service's settings, read from the environment once at start.

``PAYMESH_ENV=production`` tightens where webhooks may go (see ``delivery``) and requires
``NOTIFICATION_SERVICE_SECRETS_KEY_FILE``: the key that seals the merchants' signing secrets,
kept outside the database. Development makes one under the var directory on first start.

The retry schedule of failed webhooks (see ``schedule``) and the delivery loop's pace, each a
positive number of seconds (or a count):

``NOTIFICATION_SERVICE_RETRY_INITIAL_S`` (10)
    the wait after a round's first failed attempt, doubling with each further failure;
``NOTIFICATION_SERVICE_RETRY_MAX_S`` (3600)
    the cap of that wait;
``NOTIFICATION_SERVICE_RETRY_HORIZON_S`` (259200, three days)
    how long a round of attempts lasts before the notification is dead-lettered;
``NOTIFICATION_SERVICE_DELIVERY_SCAN_S`` (1)
    how often the delivery loop looks for due notifications;
``NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY`` (8)
    how many attempts the loop makes at once;
``NOTIFICATION_SERVICE_INLINE_WAIT_S`` (1)
    how long SendNotification waits for a new notification's first attempt before it
    answers PENDING (the attempt goes on);
``NOTIFICATION_SERVICE_WEBHOOK_POOLS`` (64)
    how many webhook destinations (host, port and checked addresses) keep connections open
    for their next post, the least recently used closed beyond it;
``NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S`` (4)
    how long an idle webhook connection is kept.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.mesh.bootstrap import StartupError
from services.mesh.tls import ENV_VAR, is_production
from services.notification.delivery import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_POOLS, PoolSettings
from services.notification.dispatch import (
    DEFAULT_CONCURRENCY,
    DEFAULT_INLINE_WAIT_S,
    DEFAULT_SCAN_INTERVAL_S,
    LoopSettings,
)
from services.notification.schedule import DeliverySchedule

SECRETS_KEY_FILE_VAR = "NOTIFICATION_SERVICE_SECRETS_KEY_FILE"
RETRY_INITIAL_VAR = "NOTIFICATION_SERVICE_RETRY_INITIAL_S"
RETRY_MAX_VAR = "NOTIFICATION_SERVICE_RETRY_MAX_S"
RETRY_HORIZON_VAR = "NOTIFICATION_SERVICE_RETRY_HORIZON_S"
DELIVERY_SCAN_VAR = "NOTIFICATION_SERVICE_DELIVERY_SCAN_S"
DELIVERY_CONCURRENCY_VAR = "NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY"
INLINE_WAIT_VAR = "NOTIFICATION_SERVICE_INLINE_WAIT_S"
WEBHOOK_POOLS_VAR = "NOTIFICATION_SERVICE_WEBHOOK_POOLS"
WEBHOOK_KEEPALIVE_VAR = "NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S"
DEFAULT_KEY_FILE = "notification-service-secrets.key"
KEY_BYTES = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationConfig:
    """Where webhooks may go and which file holds the key sealing the signing secrets."""

    production: bool = False
    """Whether ``PAYMESH_ENV`` is ``production``."""
    key_file: Path
    """File holding the sealing key as 64 hex digits."""
    key_file_given: bool = False
    """Whether the key file was named explicitly (required in production)."""
    schedule: DeliverySchedule = field(default_factory=DeliverySchedule)
    """When failed webhooks are attempted again, and when they are dead-lettered."""
    loop: LoopSettings = field(default_factory=LoopSettings)
    """The delivery loop's pace."""
    pools: PoolSettings = field(default_factory=PoolSettings)
    """The webhook connections kept open between posts."""

    def __post_init__(self) -> None:
        if self.production and not self.key_file_given:
            raise StartupError(
                f"{ENV_VAR}=production needs {SECRETS_KEY_FILE_VAR} (a file of {2 * KEY_BYTES} hex "
                "digits, e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], var_dir: Path) -> NotificationConfig:
        """The settings in ``environ``; the key file defaults to one in ``var_dir``.

        Raises:
            StartupError: a schedule, loop or connection variable is not a positive number
                (or the maximum wait is below the initial one).
        """
        named = environ.get(SECRETS_KEY_FILE_VAR, "").strip()
        timing: dict[str, float] = {}
        for var, name in (
            (RETRY_INITIAL_VAR, "initial_backoff_s"),
            (RETRY_MAX_VAR, "max_backoff_s"),
            (RETRY_HORIZON_VAR, "horizon_s"),
        ):
            if var in environ:
                timing[name] = _positive(environ, var)
        try:
            schedule = DeliverySchedule(**timing)
        except ValueError as exc:
            given = [
                f"{var}={environ[var]!r}"
                for var in (RETRY_INITIAL_VAR, RETRY_MAX_VAR, RETRY_HORIZON_VAR)
                if var in environ
            ]
            raise StartupError(f"{', '.join(given)}: {exc}") from exc
        scan_s = _positive(environ, DELIVERY_SCAN_VAR, default=DEFAULT_SCAN_INTERVAL_S)
        concurrency = int(
            _positive(environ, DELIVERY_CONCURRENCY_VAR, whole=True, default=DEFAULT_CONCURRENCY)
        )
        inline_s = _positive(environ, INLINE_WAIT_VAR, default=DEFAULT_INLINE_WAIT_S)
        loop = LoopSettings(scan_interval_s=scan_s, concurrency=concurrency, inline_wait_s=inline_s)
        max_pools = int(
            _positive(environ, WEBHOOK_POOLS_VAR, whole=True, default=DEFAULT_MAX_POOLS)
        )
        keepalive_s = _positive(environ, WEBHOOK_KEEPALIVE_VAR, default=DEFAULT_KEEPALIVE_S)
        pools = PoolSettings(max_pools=max_pools, keepalive_s=keepalive_s)
        return cls(
            production=is_production(environ),
            key_file=Path(named) if named else var_dir / DEFAULT_KEY_FILE,
            key_file_given=bool(named),
            schedule=schedule,
            loop=loop,
            pools=pools,
        )

    def sealing_key(self) -> bytes:
        """The key's 32 bytes; a development key is created (mode 0600) if missing.

        Raises:
            StartupError: the file is missing (production) or does not hold 64 hex digits.
        """
        if not self.key_file_given and not self.key_file.exists():
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            text = self.key_file.read_text().strip()
        except OSError as exc:
            raise StartupError(
                f"{SECRETS_KEY_FILE_VAR}={str(self.key_file)!r}: cannot read it: {exc}"
            ) from exc
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            named = f"{SECRETS_KEY_FILE_VAR}=" if self.key_file_given else ""
            raise StartupError(
                f"{named}{str(self.key_file)!r}: the file must hold {2 * KEY_BYTES} hex digits"
            )
        return key


def _positive(
    environ: Mapping[str, str], var: str, *, whole: bool = False, default: float | None = None
) -> float:
    """The positive number ``var`` holds (a whole one if ``whole``), ``default`` when it is
    unset and a default is given; StartupError if not."""
    if default is not None and var not in environ:
        return default
    raw = environ[var]
    try:
        value = float(int(raw)) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        kind = "a positive whole number" if whole else "a positive number of seconds"
        raise StartupError(f"{var}={raw!r}: must be {kind}")
    return value
