"""notification-service's settings, read from the environment once at start.

``PAYMESH_ENV=production`` tightens where webhooks may go (see ``delivery``) and requires
``NOTIFICATION_SERVICE_SECRETS_KEY_FILE``: the key that seals the merchants' signing secrets,
kept outside the database. Development makes one under the var directory on first start.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.bootstrap import StartupError
from services.tls import ENV_VAR, is_production

SECRETS_KEY_FILE_VAR = "NOTIFICATION_SERVICE_SECRETS_KEY_FILE"
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

    def __post_init__(self) -> None:
        if self.production and not self.key_file_given:
            raise StartupError(
                f"{ENV_VAR}=production needs {SECRETS_KEY_FILE_VAR} (a file of {2 * KEY_BYTES} hex "
                "digits, e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], var_dir: Path) -> NotificationConfig:
        """The settings in ``environ``; the key file defaults to one in ``var_dir``."""
        named = environ.get(SECRETS_KEY_FILE_VAR, "").strip()
        return cls(
            production=is_production(environ),
            key_file=Path(named) if named else var_dir / DEFAULT_KEY_FILE,
            key_file_given=bool(named),
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
                f"{SECRETS_KEY_FILE_VAR}: cannot read {self.key_file}: {exc}"
            ) from exc
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise StartupError(f"{self.key_file} must hold {2 * KEY_BYTES} hex digits")
        return key
