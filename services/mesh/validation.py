"""Request checks every service shares: money, ids, strings, addresses, page tokens.

Each check raises :class:`services.mesh.errors.InvalidArgument` with a BadRequest field
violation naming the field, so bad input always reaches the caller as a precise status;
a message shows bad input only through :func:`quote`, a short prefix and the length.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from interceptors.errors import Reason
from services.mesh import page_tokens
from services.mesh.errors import FieldViolation, InvalidArgument

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
#: Longest textual IP address: an IPv4-mapped IPv6 address, ``ffff:...:255.255.255.255``.
MAX_IP_LENGTH = 45
#: Characters of caller input a message quotes before cutting it short.
QUOTE_LIMIT = 32
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_COUNTRY = re.compile(r"[A-Z]{2}")
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


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``value`` for a message: its repr, cut to ``limit`` characters plus its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({len(value)} chars)"


def invalid(
    field: str, description: str, *, reason: Reason = Reason.VALIDATION_FAILED
) -> InvalidArgument:
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
            f"{quote(code)} is not a supported ISO 4217 code"
            f" ({', '.join(sorted(CURRENCY_EXPONENT))})",
            reason=Reason.CURRENCY_UNSUPPORTED,
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
            reason=Reason.AMOUNT_INVALID,
        )
    if amount > MAX_AMOUNT_MINOR:
        raise invalid(
            f"{field}.amount_minor",
            f"{amount} exceeds the maximum of {MAX_AMOUNT_MINOR} minor units",
            reason=Reason.AMOUNT_INVALID,
        )
    return amount


def require_id(field: str, value: str) -> str:
    """A non-empty id of letters, digits and ``_.:-``, at most 64 characters."""
    if not value:
        raise invalid(field, "is required")
    if not _ID.fullmatch(value):  # not match() with "$": that lets a trailing newline in
        raise invalid(
            field, f"must be 1-{MAX_ID_LENGTH} letters, digits or _.:- (got {quote(value)})"
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


def optional_ip(field: str, value: str) -> str:
    """An IPv4 or IPv6 address without a zone (``%eth0``), or empty."""
    if not value:
        return value
    try:
        # ipaddress accepts a zone of any length after '%': bound the text first.
        if len(value) > MAX_IP_LENGTH or "%" in value:
            raise ValueError(value)
        ipaddress.ip_address(value)
    except ValueError:
        raise invalid(field, f"{quote(value)} is not an IPv4 or IPv6 address") from None
    return value


def optional_country_code(field: str, value: str) -> str:
    """An ISO 3166-1 alpha-2 country code (``DE``), or empty."""
    if value and not _COUNTRY.fullmatch(value):
        raise invalid(field, f"{quote(value)} is not an ISO 3166-1 alpha-2 code such as 'DE'")
    return value


def page_size(value: int) -> int:
    """The effective page size: default for 0, clamped to the maximum, never negative."""
    if value < 0:
        raise invalid("page_size", f"must not be negative, got {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(position: Mapping[str, Any], filters: Mapping[str, Any]) -> str:
    """An opaque, signed token for the page after ``position`` under ``filters``."""
    return page_tokens.process_codec().encode(position, filters)


def decode_page_token(token: str, filters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The position a token points at (``None`` for the first page).

    Raises:
        InvalidArgument: ``PAGE_TOKEN_INVALID`` when the token is too long, not signed by
            this deployment's key, or issued for other ``filters``.
    """
    if not token:
        return None
    try:
        return page_tokens.process_codec().decode(token, filters)
    except page_tokens.PageTokenInvalid as exc:
        raise invalid("page_token", str(exc), reason=Reason.PAGE_TOKEN_INVALID) from None


def _forged_token() -> InvalidArgument:
    return invalid(
        "page_token", "is not a token this service issued", reason=Reason.PAGE_TOKEN_INVALID
    )


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
