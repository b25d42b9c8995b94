"""merchant-auth's key digests, legacy scrypt verification, bearer parsing and the pepper."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest

from services.merchant_auth.keys import (
    KeyVerifier,
    PepperedHasher,
    bearer_secret,
    key_id_of,
    legacy_scrypt_matches,
    new_key,
)
from services.merchant_auth.pepper import load_pepper
from services.mesh.bootstrap import StartupError

PEPPER = bytes(range(32))
SECRET = new_key().secret


def _scrypt_row(secret: str, *, n: int = 2**4, salt: bytes = b"s" * 16) -> str:
    """``scrypt$n$r$p$salt$digest`` as the scrypt-era service stored it (small n: fast)."""
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=8, p=1, dklen=32)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return "$".join(("scrypt", str(n), "8", "1", *encoded))


# --- Secrets --------------------------------------------------------------------------------


def test_a_new_key_is_recognised_by_its_public_lookup_id() -> None:
    key = new_key()
    assert key.secret.startswith(f"{key.prefix}_")
    assert key_id_of(key.secret) == key.key_id
    assert key.secret not in repr(key)


@pytest.mark.parametrize("text", ["", "sk_live_abc", "sk_0123456789abcdef_short", SECRET + "x"])
def test_text_not_shaped_like_a_secret_has_no_key_id(text: str) -> None:
    assert key_id_of(text) is None


# --- HMAC-SHA256 under the pepper ------------------------------------------------------------


def test_the_digest_carries_its_scheme_and_matches_only_its_secret() -> None:
    hasher = PepperedHasher(PEPPER)
    stored = hasher.digest(SECRET)
    scheme, _, digest = stored.partition("$")
    assert scheme == "hmac-sha256"
    assert len(base64.b64decode(digest)) == 32
    assert hasher.matches(SECRET, stored)
    assert not hasher.matches(new_key().secret, stored)


def test_the_digest_depends_on_the_pepper() -> None:
    stored = PepperedHasher(PEPPER).digest(SECRET)
    assert not PepperedHasher(bytes(32)).matches(SECRET, stored)


@pytest.mark.parametrize(
    "stored", ["", "hmac-sha256$", "hmac-sha256$not base64!", "sha256$AAAA", "hmac-sha256"]
)
def test_a_malformed_stored_digest_never_matches(stored: str) -> None:
    assert not PepperedHasher(PEPPER).matches(SECRET, stored)


def test_a_short_pepper_is_refused_and_never_shown() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PepperedHasher(b"short")
    assert repr(PEPPER) not in repr(PepperedHasher(PEPPER))


# --- Legacy scrypt rows ----------------------------------------------------------------------


def test_a_legacy_scrypt_hash_matches_its_secret_only() -> None:
    stored = _scrypt_row(SECRET)
    assert legacy_scrypt_matches(SECRET, stored)
    assert not legacy_scrypt_matches(new_key().secret, stored)


@pytest.mark.parametrize(
    "stored",
    ["scrypt$16$8$1$salt", "scrypt$x$8$1$AAAA$AAAA", "scrypt$3$8$1$AAAA$AAAA", "bcrypt$1$2$3$4$5"],
)
def test_a_malformed_legacy_hash_never_matches(stored: str) -> None:
    assert not legacy_scrypt_matches(SECRET, stored)


async def test_the_verifier_checks_current_digests_without_upgrading_them() -> None:
    hasher = PepperedHasher(PEPPER)
    verification = await KeyVerifier(hasher).verify(SECRET, hasher.digest(SECRET))
    assert verification.matches
    assert verification.upgraded_hash is None


async def test_a_legacy_match_comes_with_the_hmac_digest_to_store_instead() -> None:
    hasher = PepperedHasher(PEPPER)
    verification = await KeyVerifier(hasher).verify(SECRET, _scrypt_row(SECRET))
    assert verification.matches
    assert verification.upgraded_hash == hasher.digest(SECRET)


async def test_a_legacy_mismatch_is_not_upgraded() -> None:
    verification = await KeyVerifier(PepperedHasher(PEPPER)).verify(
        new_key().secret, _scrypt_row(SECRET)
    )
    assert not verification.matches
    assert verification.upgraded_hash is None


async def test_an_unknown_scheme_never_matches() -> None:
    verification = await KeyVerifier(PepperedHasher(PEPPER)).verify(SECRET, f"argon2${SECRET}")
    assert not verification.matches


# --- Bearer metadata -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([f"Bearer {SECRET}"], SECRET),
        ([f"bearer {SECRET}"], SECRET),
        ([f"  BEARER   {SECRET}  "], SECRET),
        ([], None),
        (["Bearer"], None),
        (["Bearer    "], None),
        ([SECRET], None),
        ([f"Basic {SECRET}"], None),
        ([f"Bearer {SECRET}", f"Bearer {SECRET}"], None),
        ([f"Bearer {SECRET}".encode()], None),
    ],
)
def test_the_bearer_secret_is_the_token_of_the_single_authorization_value(
    values: list[str | bytes], expected: str | None
) -> None:
    assert bearer_secret(values) == expected


# --- The pepper ------------------------------------------------------------------------------


def test_without_a_file_a_pepper_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    calls: list[int] = []

    def token_bytes(size: int) -> bytes:
        calls.append(size)
        return bytes([len(calls)]) * size

    first = load_pepper(None, var_dir=tmp_path / "var", token_bytes=token_bytes)
    again = load_pepper(None, var_dir=tmp_path / "var", token_bytes=token_bytes)
    path = tmp_path / "var" / "merchant-auth-service.pepper"
    assert first == again == path.read_bytes() == b"\x01" * 32
    assert calls == [32]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_a_configured_pepper_file_is_used_as_it_is(tmp_path: Path) -> None:
    configured = tmp_path / "mounted"
    configured.write_bytes(b"p" * 40 + b"\n")
    assert load_pepper(configured, var_dir=tmp_path) == b"p" * 40 + b"\n"
    assert not (tmp_path / "merchant-auth-service.pepper").exists()


def test_a_missing_pepper_file_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE=.*missing"):
        load_pepper(tmp_path / "missing", var_dir=tmp_path)


def test_a_short_pepper_file_stops_start_up(tmp_path: Path) -> None:
    configured = tmp_path / "short"
    configured.write_bytes(b"x" * 31)
    with pytest.raises(StartupError, match="31 bytes; a key pepper needs at least 32"):
        load_pepper(configured, var_dir=tmp_path)


def test_a_group_readable_pepper_is_used_but_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    configured = tmp_path / "mounted"
    configured.write_bytes(b"p" * 32)
    configured.chmod(0o644)
    assert load_pepper(configured, var_dir=tmp_path) == b"p" * 32
    assert "should be 0600" in caplog.text
    assert "pppp" not in caplog.text
