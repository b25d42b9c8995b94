"""The shared List paging: one page of fetched rows, its next token, and typed positions."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from services.mesh import page_tokens
from services.mesh import validation as v
from services.mesh.errors import InvalidArgument

FILTERS = {"merchant_id": "m1", "status": 0}


def _signed(payload: bytes) -> str:
    """A token holding ``payload`` as this process's key signs it (the wire format)."""
    key = page_tokens.process_codec().key
    mac = hmac.digest(key, b"paymesh.page-token.v1\x00" + payload, hashlib.sha256)
    encode = base64.urlsafe_b64encode
    return f"{encode(payload).decode().rstrip('=')}.{encode(mac).decode().rstrip('=')}"


def _position(row: tuple[int, str]) -> dict[str, Any]:
    return {"t": row[0], "id": row[1]}


def _reason_and_field(token: str, fields: v.PositionFields = v.NANOS_AND_ID) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, fields)
    (violation,) = raised.value.field_violations
    return raised.value.reason, violation.field


def test_short_fetch_is_the_last_page_without_a_token() -> None:
    rows = [(3, "c"), (2, "b")]
    assert v.page_of(rows, 2, FILTERS, _position) == (rows, "")


def test_extra_row_is_cut_and_the_token_points_at_the_last_row_kept() -> None:
    page, token = v.page_of([(3, "c"), (2, "b"), (1, "a")], 2, FILTERS, _position)
    assert page == [(3, "c"), (2, "b")]
    assert v.page_position(token, FILTERS, v.NANOS_AND_ID) == (2, "b")


def test_empty_token_is_the_first_page() -> None:
    assert v.page_position("", FILTERS, v.NANOS_AND_ID) is None


def test_seconds_position_reads_back_as_float() -> None:
    token = v.encode_page_token({"t": 1.5, "id": "x"}, FILTERS)
    assert v.page_position(token, FILTERS, v.SECONDS_AND_ID) == (1.5, "x")


def test_token_is_opaque_and_within_the_length_bound() -> None:
    token = v.encode_page_token({"t": 2**62, "id": "x" * v.MAX_ID_LENGTH}, FILTERS)
    assert len(token) <= page_tokens.MAX_TOKEN_LENGTH
    assert "merchant_id" not in base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()


@pytest.mark.parametrize(
    ("position", "fields"),
    [
        ({"t": "soon", "id": "x"}, v.SECONDS_AND_ID),
        ({"t": "12", "id": "x"}, v.NANOS_AND_ID),
        ({"t": 1.5, "id": "x"}, v.NANOS_AND_ID),
        ({"t": 2**63, "id": "x"}, v.NANOS_AND_ID),
        ({"t": 1, "id": 7}, v.NANOS_AND_ID),
        ({"id": "x"}, v.NANOS_AND_ID),
        ({}, v.NANOS_AND_ID),
    ],
)
def test_signed_position_of_the_wrong_shape_is_page_token_invalid(
    position: dict[str, Any], fields: v.PositionFields
) -> None:
    token = v.encode_page_token(position, FILTERS)
    assert _reason_and_field(token, fields) == ("PAGE_TOKEN_INVALID", "page_token")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"_f":"%s","id":"x","t":NaN}',
        b'{"_f":"%s","id":"x","t":true}',
        b'{"_f":"%s","id":"x","t":[1]}',
        b'{"_f":"%s","id":"x","t":{"a":1}}',
        b'["%s"]',
        b"\xff%s",
    ],
)
def test_signed_payload_that_is_not_a_flat_object_of_scalars_is_page_token_invalid(
    payload: bytes,
) -> None:
    fingerprint = page_tokens.filters_fingerprint(FILTERS).encode()
    token = _signed(payload.replace(b"%s", fingerprint))
    assert _reason_and_field(token, v.SECONDS_AND_ID) == ("PAGE_TOKEN_INVALID", "page_token")


@pytest.mark.parametrize(
    "token",
    [
        # The old format: bare base64 JSON, which anyone could write.
        base64.urlsafe_b64encode(b'{"f": {"merchant_id": "m1", "status": 0}, "p": {"t": 1}}')
        .decode()
        .rstrip("="),
        "no-dot-at-all",
        "a.b.c",
        ".",
        "eyJ0IjoxfQ.!!!",
        "eyJ0IjoxfQ.AAAA",
    ],
)
def test_unsigned_or_malformed_token_is_page_token_invalid(token: str) -> None:
    assert _reason_and_field(token) == ("PAGE_TOKEN_INVALID", "page_token")


def test_tampered_position_is_page_token_invalid() -> None:
    token = v.encode_page_token({"t": 1, "id": "x"}, FILTERS)
    payload, mac = token.split(".")
    forged = base64.urlsafe_b64decode(payload + "==").replace(b'"t":1', b'"t":2')
    forged_token = base64.urlsafe_b64encode(forged).decode().rstrip("=") + "." + mac
    assert _reason_and_field(forged_token) == ("PAGE_TOKEN_INVALID", "page_token")


def test_token_of_another_key_is_page_token_invalid() -> None:
    other = page_tokens.PageTokenCodec(key=b"k" * page_tokens.MIN_KEY_BYTES)
    token = other.encode({"t": 1, "id": "x"}, FILTERS)
    assert _reason_and_field(token) == ("PAGE_TOKEN_INVALID", "page_token")


def test_deeply_nested_token_is_page_token_invalid_not_a_recursion_error() -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    token = base64.urlsafe_b64encode(nested).decode()
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, v.NANOS_AND_ID)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
    assert len(raised.value.message) < 200


def test_token_over_the_length_bound_is_refused_before_decoding() -> None:
    token = "A" * (page_tokens.MAX_TOKEN_LENGTH + 1)
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, v.NANOS_AND_ID)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
    assert f"at most {page_tokens.MAX_TOKEN_LENGTH}" in raised.value.message
    assert "AAAA" not in raised.value.message


def test_token_of_other_filters_is_page_token_invalid() -> None:
    token = v.encode_page_token({"t": 1, "id": "x"}, {"merchant_id": "m2", "status": 0})
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, v.NANOS_AND_ID)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
    assert "different filter" in raised.value.message


@pytest.mark.parametrize(
    "position", [{"t": [1], "id": "x"}, {"t": True}, {"t": float("nan")}, {"_f": "x"}]
)
def test_encoding_refuses_a_position_that_is_not_flat_finite_scalars(
    position: dict[str, Any],
) -> None:
    with pytest.raises(ValueError):
        v.encode_page_token(position, FILTERS)
