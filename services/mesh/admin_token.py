"""Who may use the control routes (fault switches): nobody, unless fault injection is enabled.

Enabled with ``PAYMESH_FAULT_INJECTION=1``, a control route then takes
``Authorization: Bearer <token>``, the token being the contents of the file named by
``PAYMESH_ADMIN_TOKEN_FILE``. The launcher writes that file (:func:`with_admin_token`), the
admin endpoints and the partner sandbox check it (:class:`ControlAccess`), and tooling sends
it (:func:`admin_authorization`). The token itself is never logged, printed or repr'd.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from interceptors.errors import Reason

#: ``1`` switches the control routes on (still behind the admin token); unset or ``0``: off.
FAULT_INJECTION_VAR = "PAYMESH_FAULT_INJECTION"
#: The file holding the admin token; required when fault injection is enabled.
ADMIN_TOKEN_FILE_VAR = "PAYMESH_ADMIN_TOKEN_FILE"
#: Name of the token file the launcher writes into the var directory.
ADMIN_TOKEN_FILE = "admin.token"
#: Shortest token accepted (the launcher writes 43 characters, 256 random bits).
MIN_TOKEN_CHARS = 16

_ENABLED = frozenset({"1", "true", "yes", "on"})
_DISABLED = frozenset({"", "0", "false", "no", "off"})


class AdminTokenError(ValueError):
    """Fault injection is misconfigured; the message names the variable or file to fix."""


def fault_injection_enabled(environ: Mapping[str, str]) -> bool:
    """Whether ``PAYMESH_FAULT_INJECTION`` switches the control routes on.

    Raises:
        AdminTokenError: the value is neither on (1) nor off (0).
    """
    value = environ.get(FAULT_INJECTION_VAR, "").strip().lower()
    if value in _ENABLED:
        return True
    if value in _DISABLED:
        return False
    raise AdminTokenError(f"{FAULT_INJECTION_VAR}={value!r}: use 1 (on) or 0 (off)")


def read_admin_token(path: Path) -> str:
    """The token in ``path``; AdminTokenError if missing, readable by others or too short."""
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"{ADMIN_TOKEN_FILE_VAR}={path}: cannot read it: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AdminTokenError(
            f"{ADMIN_TOKEN_FILE_VAR}={path}: group or others may access it; chmod 600 {path}"
        )
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AdminTokenError(
            f"{ADMIN_TOKEN_FILE_VAR}={path}: the token must be one word of at least "
            f"{MIN_TOKEN_CHARS} characters"
        )
    return token


def _digest(text: str) -> bytes:
    # Comparing digests keeps the comparison's time independent of the presented length too.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a control request is refused, as an HTTP answer."""

    status: int
    """403 when the routes are off, 401 when the token is missing or wrong."""
    reason: str
    """Stable upper-snake reason for the JSON error."""
    message: str
    """What the caller should do."""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Response headers: the challenge of a 401."""
        return (("WWW-Authenticate", 'Bearer realm="paymesh-admin"'),) if self.status == 401 else ()

    def as_json(self) -> dict[str, str]:
        """The JSON error body."""
        return {"error": self.message, "reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlAccess:
    """The gate in front of control routes: off by default, else the admin token."""

    enabled: bool = False
    """Whether fault injection is switched on at all."""
    token_digest: bytes = field(default=b"", repr=False)
    """SHA-256 of the admin token (the token itself is not kept)."""

    def __post_init__(self) -> None:
        if self.enabled and len(self.token_digest) != hashlib.sha256().digest_size:
            raise AdminTokenError("fault injection is enabled but no admin token is set")

    @classmethod
    def with_token(cls, token: str) -> ControlAccess:
        """Enabled, accepting ``token``."""
        return cls(enabled=True, token_digest=_digest(token))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ControlAccess:
        """Off unless ``PAYMESH_FAULT_INJECTION=1``; then the token of ``PAYMESH_ADMIN_TOKEN_FILE``.

        Raises:
            AdminTokenError: enabled without a readable, private token file.
        """
        if not fault_injection_enabled(environ):
            return cls()
        name = environ.get(ADMIN_TOKEN_FILE_VAR, "").strip()
        if not name:
            raise AdminTokenError(
                f"{FAULT_INJECTION_VAR}=1 needs {ADMIN_TOKEN_FILE_VAR} naming a file that holds "
                f"the admin token (the launcher writes var/{ADMIN_TOKEN_FILE} and sets it)"
            )
        return cls.with_token(read_admin_token(Path(name)))

    def refusal(self, authorization: str | None) -> Refusal | None:
        """Why a request with this ``Authorization`` header value is refused; None: allowed."""
        if not self.enabled:
            return Refusal(
                status=403,
                reason=Reason.FAULT_INJECTION_DISABLED,
                message=f"control routes are off; start the service with {FAULT_INJECTION_VAR}=1",
            )
        if not authorization:
            return Refusal(
                status=401,
                reason=Reason.CREDENTIALS_MISSING,
                message="send Authorization: Bearer <admin token>",
            )
        scheme, _, presented = authorization.strip().partition(" ")
        valid = hmac.compare_digest(_digest(presented.strip()), self.token_digest)
        if scheme.lower() != "bearer" or not valid:
            return Refusal(
                status=401,
                reason=Reason.ADMIN_TOKEN_INVALID,
                message=f"the bearer token is not the admin token ({ADMIN_TOKEN_FILE_VAR})",
            )
        return None


def issue_admin_token(path: Path) -> None:
    """Write a fresh random token to ``path`` (mode 0600, replacing any old one atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def with_admin_token(environ: Mapping[str, str], var_dir: Path) -> dict[str, str]:
    """``environ`` for the mesh's children: with fault injection on, a token file for them all.

    Off: unchanged. On, without ``PAYMESH_ADMIN_TOKEN_FILE``: a fresh ``var_dir/admin.token``
    (0600) and the variable naming it. On, with the variable set: unchanged (the operator's file;
    each service checks it at start).
    """
    result = dict(environ)
    if fault_injection_enabled(result) and not result.get(ADMIN_TOKEN_FILE_VAR, "").strip():
        path = var_dir / ADMIN_TOKEN_FILE
        issue_admin_token(path)
        result[ADMIN_TOKEN_FILE_VAR] = str(path.resolve())
    return result


def admin_authorization(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``Authorization`` header tooling sends to control routes, from the token file.

    Raises:
        AdminTokenError: ``PAYMESH_ADMIN_TOKEN_FILE`` is unset or its file unusable.
    """
    name = environ.get(ADMIN_TOKEN_FILE_VAR, "").strip()
    if not name:
        raise AdminTokenError(
            f"{ADMIN_TOKEN_FILE_VAR} is not set: start the mesh with {FAULT_INJECTION_VAR}=1"
        )
    return {"Authorization": f"Bearer {read_admin_token(Path(name))}"}
