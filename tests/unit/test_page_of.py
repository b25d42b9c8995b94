"""The shared List paging: one page of fetched rows, its next token, and typed positions."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from interceptors.errors import InvalidArgument
from services import validation as v

FILTERS = {"merchant_id": "m1", "status": 0}


def _forged(position: Any, filters: Any = FILTERS) -> str:
    raw = json.dumps({"p": position, "f": filters}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _position(row: tuple[int, str]) -> dict[str, Any]:
    return {"t": row[0], "id": row[1]}


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


@pytest.mark.parametrize(
    ("position", "fields"),
    [
        ({"t": "soon", "id": "x"}, v.SECONDS_AND_ID),
        ({"t": "12", "id": "x"}, v.NANOS_AND_ID),
        ({"t": 1.5, "id": "x"}, v.NANOS_AND_ID),
        ({"t": True, "id": "x"}, v.NANOS_AND_ID),
        ({"t": 2**63, "id": "x"}, v.NANOS_AND_ID),
        ({"t": 1, "id": 7}, v.NANOS_AND_ID),
        ({"t": [1], "id": "x"}, v.SECONDS_AND_ID),
        ({"id": "x"}, v.NANOS_AND_ID),
        ({}, v.NANOS_AND_ID),
    ],
)
def test_forged_position_is_page_token_invalid(position: Any, fields: v.PositionFields) -> None:
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(_forged(position), FILTERS, fields)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"


def test_non_finite_seconds_are_page_token_invalid() -> None:
    token = base64.urlsafe_b64encode(
        b'{"f": {"merchant_id": "m1", "status": 0}, "p": {"id": "x", "t": NaN}}'
    ).decode()
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, v.SECONDS_AND_ID)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"


def test_token_of_other_filters_is_page_token_invalid() -> None:
    token = v.encode_page_token({"t": 1, "id": "x"}, {"merchant_id": "m2", "status": 0})
    with pytest.raises(InvalidArgument) as raised:
        v.page_position(token, FILTERS, v.NANOS_AND_ID)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
