"""Request checks every service shares: money, ids, strings, page tokens.

Each check raises :class:`interceptors.errors.InvalidArgument` with a BadRequest field
violation naming the field, so bad input always reaches the caller as a precise status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from interceptors.errors import FieldViolation, InvalidArgument

#: ISO 4217 codes the platform settles in, with their minor-unit exponent.
CURRENCY_EXPONENT: Mapping[str, int] = {
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "JPY": 0,
    "CNY": 2,
    "CAD": 2,
    "AUD": 2,
    "CHF": 2,
    "SGD": 2,
    "HKD": 2,
}
#: Largest amount a single payment, refund or transfer may carry (minor units). Far below
#: int64 so sums of many amounts cannot overflow in the ledger.
MAX_AMOUNT_MINOR = 10**12
MAX_ID_LENGTH = 64
MAX_TEXT_LENGTH = 500
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
#: SQLite's INTEGER range: a cursor outside it could not even be bound to a query.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

T = TypeVar("T")
#: The type of each field of a page position: ``int``, ``float`` or ``str``.
PositionFields = Mapping[str, type[int] | type[float] | type[str]]
#: A position of a row created at ``t`` nanoseconds with id ``id``.
NANOS_AND_ID: PositionFields = {"t": int, "id": str}
#: A position of a row created at ``t`` seconds (a float) with id ``id``.
SECONDS_AND_ID: PositionFields = {"t": float, "id": str}


class MoneyLike(Protocol):
    """The shape of paymesh.common.v1.Money."""

    amount_minor: int
    currency_code: str


def invalid(field: str, description: str, *, reason: str = "VALIDATION_FAILED") -> InvalidArgument:
    """An InvalidArgument naming one bad field."""
    return InvalidArgument(
        f"{field}: {description}",
        reason=reason,
        field_violations=[FieldViolation(field, description)],
    )


def require_currency(field: str, code: str) -> str:
    """The currency code, if the platform supports it."""
    if code not in CURRENCY_EXPONENT:
        raise invalid(
            field,
            f"{code!r} is not a supported ISO 4217 code ({', '.join(sorted(CURRENCY_EXPONENT))})",
            reason="CURRENCY_UNSUPPORTED",
        )
    return code


def require_amount(field: str, money: MoneyLike, *, allow_zero: bool = False) -> int:
    """The amount in minor units: positive (or zero if allowed), bounded, currency supported."""
    require_currency(f"{field}.currency_code", money.currency_code)
    amount = int(money.amount_minor)
    if amount < 0 or (amount == 0 and not allow_zero):
        raise invalid(
            f"{field}.amount_minor",
            f"must be {'zero or more' if allow_zero else 'positive'}, got {amount}",
            reason="AMOUNT_INVALID",
        )
    if amount > MAX_AMOUNT_MINOR:
        raise invalid(
            f"{field}.amount_minor",
            f"{amount} exceeds the maximum of {MAX_AMOUNT_MINOR} minor units",
            reason="AMOUNT_INVALID",
        )
    return amount


def require_id(field: str, value: str) -> str:
    """A non-empty id of letters, digits and ``_.:-``, at most 64 characters."""
    if not value:
        raise invalid(field, "is required")
    if not _ID.match(value):
        raise invalid(
            field, f"must be 1-{MAX_ID_LENGTH} letters, digits or _.:- (got {value[:80]!r})"
        )
    return value


def require_request_id(field: str, value: str) -> str:
    """The AIP-155 idempotency key of a mutating request: required, an id."""
    return require_id(field, value)


def optional_text(field: str, value: str, *, limit: int = MAX_TEXT_LENGTH) -> str:
    """Free text of at most ``limit`` characters."""
    if len(value) > limit:
        raise invalid(field, f"is {len(value)} characters; at most {limit} are allowed")
    return value


def page_size(value: int) -> int:
    """The effective page size: default for 0, clamped to the maximum, never negative."""
    if value < 0:
        raise invalid("page_size", f"must not be negative, got {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(position: Mapping[str, Any], filters: Mapping[str, Any]) -> str:
    """An opaque token for the page after ``position`` under ``filters``."""
    raw = json.dumps({"p": dict(position), "f": dict(filters)}, sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The position a token points at (``None`` for the first page); checks the filters match."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        position, issued_for = data["p"], data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise invalid(
            "page_token", "is not a token this service issued", reason="PAGE_TOKEN_INVALID"
        ) from exc
    if not isinstance(position, dict) or issued_for != json.loads(json.dumps(dict(filters))):
        raise invalid(
            "page_token", "was issued for a different filter", reason="PAGE_TOKEN_INVALID"
        )
    return position


def _forged_token() -> InvalidArgument:
    return invalid("page_token", "is not a token this service issued", reason="PAGE_TOKEN_INVALID")


def _position_value(value: Any, kind: type[int] | type[float] | type[str]) -> int | float | str:
    """``value`` as ``kind``; a value a token of ours could not hold is a forged token."""
    if isinstance(value, bool):
        raise _forged_token()
    if kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if kind is float and isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    raise _forged_token()


def page_position(
    token: str, filters: Mapping[str, Any], fields: PositionFields
) -> tuple[Any, ...] | None:
    """The position a token points at, one typed value per field, ``None`` for the first page.

    A token that is not ours, or whose fields are missing or of the wrong type, is
    INVALID_ARGUMENT ``PAGE_TOKEN_INVALID``; so is one issued for different ``filters``.
    """
    position = decode_page_token(token, filters)
    if position is None:
        return None
    if not fields.keys() <= position.keys():
        raise _forged_token()
    return tuple(_position_value(position[name], kind) for name, kind in fields.items())


def page_of(
    items: Sequence[T],
    size: int,
    filters: Mapping[str, Any],
    position_of: Callable[[T], Mapping[str, Any]],
) -> tuple[list[T], str]:
    """One page of ``items`` (fetched with a limit of ``size + 1``) and the next page's token.

    The token is empty on the last page; otherwise it holds ``position_of`` the page's last
    item under ``filters``.
    """
    if len(items) <= size:
        return list(items), ""
    page = list(items[:size])
    return page, encode_page_token(position_of(page[-1]), filters)
