"""The control gate's rules: off by default, then the admin token, compared as a whole."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.mesh.admin_token import (
    ADMIN_TOKEN_FILE,
    ADMIN_TOKEN_FILE_VAR,
    FAULT_INJECTION_VAR,
    AdminTokenError,
    ControlAccess,
    admin_authorization,
    fault_injection_enabled,
    issue_admin_token,
    with_admin_token,
)

TOKEN = "t" * 43


def test_fault_injection_is_off_unless_switched_on() -> None:
    assert not fault_injection_enabled({})
    assert not fault_injection_enabled({FAULT_INJECTION_VAR: "0"})
    assert fault_injection_enabled({FAULT_INJECTION_VAR: "1"})
    with pytest.raises(AdminTokenError, match=FAULT_INJECTION_VAR):
        fault_injection_enabled({FAULT_INJECTION_VAR: "maybe"})


def test_off_refuses_every_caller_with_403() -> None:
    refusal = ControlAccess().refusal(f"Bearer {TOKEN}")
    assert refusal is not None
    assert (refusal.status, refusal.reason) == (403, "FAULT_INJECTION_DISABLED")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "CREDENTIALS_MISSING"),
        ("", "CREDENTIALS_MISSING"),
        (f"Basic {TOKEN}", "ADMIN_TOKEN_INVALID"),
        (f"Bearer {TOKEN[:-1]}", "ADMIN_TOKEN_INVALID"),
        (f"Bearer {TOKEN}x", "ADMIN_TOKEN_INVALID"),
        ("Bearer", "ADMIN_TOKEN_INVALID"),
    ],
)
def test_on_refuses_a_missing_or_wrong_token_with_401(header: str | None, reason: str) -> None:
    refusal = ControlAccess.with_token(TOKEN).refusal(header)
    assert refusal is not None
    assert (refusal.status, refusal.reason) == (401, reason)
    assert ("WWW-Authenticate", 'Bearer realm="paymesh-admin"') in refusal.headers


def test_on_admits_the_token_whatever_the_scheme_case() -> None:
    access = ControlAccess.with_token(TOKEN)
    assert access.refusal(f"Bearer {TOKEN}") is None
    assert access.refusal(f"bearer {TOKEN}") is None


def test_the_gate_keeps_no_token_to_leak() -> None:
    access = ControlAccess.with_token(TOKEN)
    assert TOKEN not in repr(access)
    assert TOKEN.encode() not in access.token_digest


def test_on_without_a_token_file_is_a_configuration_error() -> None:
    with pytest.raises(AdminTokenError, match=ADMIN_TOKEN_FILE_VAR):
        ControlAccess.from_environ({FAULT_INJECTION_VAR: "1"})


def test_on_with_a_missing_token_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.token"
    with pytest.raises(AdminTokenError, match=r"nope\.token"):
        ControlAccess.from_environ({FAULT_INJECTION_VAR: "1", ADMIN_TOKEN_FILE_VAR: str(missing)})


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.token"
    path.write_text("abc\n")
    path.chmod(0o600)
    with pytest.raises(AdminTokenError, match="at least"):
        ControlAccess.from_environ({FAULT_INJECTION_VAR: "1", ADMIN_TOKEN_FILE_VAR: str(path)})


def test_launcher_environ_issues_a_private_token_once_named(tmp_path: Path) -> None:
    environ = with_admin_token({FAULT_INJECTION_VAR: "1"}, tmp_path)
    path = Path(environ[ADMIN_TOKEN_FILE_VAR])
    assert path == (tmp_path / ADMIN_TOKEN_FILE).resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    access = ControlAccess.from_environ(environ)
    assert access.refusal(admin_authorization(environ)["Authorization"]) is None
    # A second launcher pass keeps the named file (the operator's or the first pass's).
    assert with_admin_token(environ, tmp_path / "other") == environ


def test_launcher_environ_is_unchanged_with_fault_injection_off(tmp_path: Path) -> None:
    assert with_admin_token({"X": "1"}, tmp_path) == {"X": "1"}
    assert not (tmp_path / ADMIN_TOKEN_FILE).exists()


def test_issuing_again_replaces_the_token(tmp_path: Path) -> None:
    path = tmp_path / ADMIN_TOKEN_FILE
    issue_admin_token(path)
    first = path.read_text()
    issue_admin_token(path)
    assert path.read_text() != first
    assert [p.name for p in tmp_path.iterdir()] == [ADMIN_TOKEN_FILE]


def test_tooling_without_a_token_file_is_told_how_to_get_one() -> None:
    with pytest.raises(AdminTokenError, match=FAULT_INJECTION_VAR):
        admin_authorization({})
