"""Bad input is quoted short: a message or status never echoes a huge value back."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from interceptors import errors
from interceptors.errors import Reason, rich_status
from paymesh.common.v1 import common_pb2
from services.mesh import validation as v
from services.mesh.errors import FieldViolation, InvalidArgument

MEGABYTE = 1024 * 1024


def _bad_request(status_details: object) -> error_details_pb2.BadRequest:
    for detail in status_details:  # type: ignore[attr-defined]
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad
    raise AssertionError("no BadRequest detail")


def test_short_value_is_quoted_whole() -> None:
    assert v.quote("EUR") == "'EUR'"


def test_long_value_is_quoted_as_a_prefix_and_its_length() -> None:
    assert v.quote("x" * MEGABYTE) == f"'{'x' * v.QUOTE_LIMIT}'…({MEGABYTE} chars)"


def test_one_megabyte_currency_code_is_invalid_with_a_short_readable_description() -> None:
    with pytest.raises(InvalidArgument) as raised:
        v.require_amount("amount", common_pb2.Money(amount_minor=1, currency_code="E" * MEGABYTE))
    (violation,) = raised.value.field_violations
    assert violation.field == "amount.currency_code"
    assert f"({MEGABYTE} chars) is not a supported ISO 4217 code" in violation.description
    assert len(raised.value.message) < 300


def test_one_megabyte_id_is_invalid_with_a_short_readable_description() -> None:
    with pytest.raises(InvalidArgument) as raised:
        v.require_id("order_id", "o" * MEGABYTE)
    assert raised.value.field_violations[0].field == "order_id"
    assert f"({MEGABYTE} chars)" in raised.value.message
    assert len(raised.value.message) < 300


def test_id_with_a_trailing_newline_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        v.require_id("order_id", "o_1\n")


@pytest.mark.parametrize(
    "address", ["fe80::1%" + "a" * MEGABYTE, "fe80::1%eth0", "1" * 46, "not-an-ip"]
)
def test_address_with_a_zone_or_too_long_is_invalid(address: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        v.optional_ip("customer_ip", address)
    assert len(raised.value.message) < 200


@pytest.mark.parametrize("address", ["", "192.0.2.10", "2001:db8::1", "::ffff:192.0.2.10"])
def test_plain_addresses_are_valid(address: str) -> None:
    assert v.optional_ip("customer_ip", address) == address


@pytest.mark.parametrize("code", ["DE\n", "de", "DEU", "D" * MEGABYTE])
def test_bad_country_code_is_invalid(code: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        v.optional_country_code("customer_country_code", code)
    assert len(raised.value.message) < 200


def test_truncated_text_fits_its_byte_bound_and_says_how_long_it_was() -> None:
    cut = errors.truncated("中" * MEGABYTE, 256)
    assert len(cut.encode()) <= 256
    assert cut.endswith(f"…({MEGABYTE} chars)")
    assert errors.truncated("short", 256) == "short"


def test_status_bounds_a_huge_message_metadata_and_violations() -> None:
    huge = "中" * MEGABYTE
    status = rich_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        huge,
        domain="order-service",
        reason=Reason.VALIDATION_FAILED,
        metadata={f"{i}{huge[:10_000]}": huge for i in range(100)},
        field_violations=[FieldViolation(huge, huge)] * 100,
        retry_delay_s=1.0,
    )
    assert len(status.message.encode()) <= errors.MAX_MESSAGE_BYTES
    assert status.ByteSize() <= errors.MAX_STATUS_BYTES
    info = errors.error_info(status)
    assert info is not None and info.reason == "VALIDATION_FAILED"
    assert all(
        len(value.encode()) <= errors.MAX_METADATA_VALUE_BYTES for value in info.metadata.values()
    )
    assert errors.retry_delay_of(status) == 1.0


def test_status_of_a_small_error_is_unchanged() -> None:
    status = rich_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "order_id: is required",
        domain="order-service",
        reason=Reason.VALIDATION_FAILED,
        metadata={"order_id": "o_1"},
        field_violations=[FieldViolation("order_id", "is required")],
    )
    assert status.message == "order_id: is required"
    assert dict(errors.error_info(status).metadata) == {"order_id": "o_1"}  # type: ignore[union-attr]
    (violation,) = _bad_request(status.details).field_violations
    assert (violation.field, violation.description) == ("order_id", "is required")
