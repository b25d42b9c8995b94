"""Page-token keys: configured or generated once (mode 0600), the same across restarts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from services.mesh import page_tokens

FILTERS = {"merchant_id": "m1"}


def test_key_is_generated_once_under_the_var_dir_with_mode_0600(tmp_path: Path) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path)}
    key = page_tokens.load_key(environ)
    path = tmp_path / page_tokens.GENERATED_KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= page_tokens.MIN_KEY_BYTES
    assert page_tokens.load_key(environ) == key
    assert [p.name for p in tmp_path.iterdir()] == [page_tokens.GENERATED_KEY_NAME]


def test_token_survives_a_restart_that_reads_the_same_var_dir(tmp_path: Path) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path)}
    before = page_tokens.PageTokenCodec(key=page_tokens.load_key(environ))
    token = before.encode({"t": 7, "id": "x"}, FILTERS)
    after = page_tokens.PageTokenCodec(key=page_tokens.load_key(environ))
    assert after.decode(token, FILTERS) == {"t": 7, "id": "x"}


def test_configured_key_file_is_used_and_never_generated(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text("s" * 40 + "\n")
    environ = {page_tokens.KEY_FILE_VAR: str(key_file), "PAYMESH_VAR_DIR": str(tmp_path)}
    assert page_tokens.load_key(environ) == b"s" * 40
    assert not (tmp_path / page_tokens.GENERATED_KEY_NAME).exists()


def test_missing_configured_key_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.key"
    with pytest.raises(page_tokens.PageTokenKeyError, match=r"absent\.key"):
        page_tokens.load_key({page_tokens.KEY_FILE_VAR: str(missing)})
    assert not missing.exists()


def test_short_key_file_is_an_error(tmp_path: Path) -> None:
    key_file = tmp_path / "short.key"
    key_file.write_text("too short")
    with pytest.raises(page_tokens.PageTokenKeyError, match="at least 32"):
        page_tokens.load_key({page_tokens.KEY_FILE_VAR: str(key_file)})


def test_tokens_of_different_keys_do_not_verify() -> None:
    first = page_tokens.PageTokenCodec(key=b"a" * 32)
    second = page_tokens.PageTokenCodec(key=b"b" * 32)
    with pytest.raises(page_tokens.PageTokenInvalid):
        second.decode(first.encode({"t": 1}, FILTERS), FILTERS)


def test_codec_length_bound_applies_to_decoding() -> None:
    codec = page_tokens.PageTokenCodec(key=b"a" * 32, max_length=100)
    with pytest.raises(page_tokens.PageTokenInvalid, match="at most 100"):
        codec.decode("x" * 101, FILTERS)
    with pytest.raises(ValueError, match="exceeds 100"):
        codec.encode({"id": "x" * 100}, FILTERS)


def test_codec_refuses_a_short_key() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        page_tokens.PageTokenCodec(key=b"short")
