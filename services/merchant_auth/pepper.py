"""The server-side pepper of merchant-auth's key digests: read from a file, or made once.

An operator names the file in ``MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE`` (a mounted secret).
Without it the service makes 32 random bytes once at ``<var dir>/merchant-auth-service.pepper``
(mode 0600) and reuses them on every start. Losing the pepper invalidates every stored key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from services.merchant_auth.keys import MIN_PEPPER_BYTES
from services.mesh.bootstrap import StartupError

log = logging.getLogger("paymesh.merchant_auth")

PEPPER_FILE_VAR = "MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE"
GENERATED_NAME = "merchant-auth-service.pepper"
GENERATED_BYTES = 32


def load_pepper(
    pepper_file: Path | None,
    *,
    var_dir: Path,
    token_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> bytes:
    """The pepper: ``pepper_file``'s bytes as they are, else the generated one in ``var_dir``.

    Raises:
        StartupError: the file cannot be read or holds fewer than 32 bytes.
    """
    if pepper_file is not None:
        return _read(pepper_file, source=f"{PEPPER_FILE_VAR}={str(pepper_file)!r}")
    path = var_dir / GENERATED_NAME
    if not path.exists():
        _create(path, token_bytes(GENERATED_BYTES))
    return _read(path, source=f"the generated pepper {str(path)!r}")


def _read(path: Path, *, source: str) -> bytes:
    try:
        pepper = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise StartupError(f"cannot read {source}: {exc.strerror or exc}") from exc
    if len(pepper) < MIN_PEPPER_BYTES:
        raise StartupError(
            f"{source} holds {len(pepper)} bytes; a key pepper needs at least {MIN_PEPPER_BYTES}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o); it should be 0600", source, mode)
    return pepper


def _create(path: Path, pepper: bytes) -> None:
    """Write ``pepper`` to ``path`` with mode 0600, without ever replacing an existing file.

    The bytes go to a private temporary file first and are then hard-linked into place, so a
    concurrent start sees either no file or the complete one, and the first link wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask says
            out.write(pepper)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another start won: use its pepper
            os.link(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the link survives a crash, like the keys made with it
        finally:
            os.close(directory)
    except OSError as exc:
        raise StartupError(f"cannot create the key pepper {str(path)!r}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
