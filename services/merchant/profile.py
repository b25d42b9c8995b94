"""Checks of a merchant profile's fields: name, email, country, webhook URL.

Each check raises InvalidArgument with a field violation (via services.mesh.validation), so a
bad profile reaches the caller as a precise status naming the field.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse

from services.mesh import validation as v

MAX_NAME_LENGTH = 200
#: RFC 5321 caps a forward path at 254 characters.
MAX_EMAIL_LENGTH = 254
MAX_URL_LENGTH = 2048
_EMAIL = re.compile(r"^[^@\s]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
#: Hosts a webhook may reach over plain http: a local endpoint in development only.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# Kept as one block of text: 249 two-letter codes read better as a table than as a list.
_ASSIGNED_COUNTRY_CODES = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
    DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
    GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
    KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
    MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
    PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
    VN VU WF WS YE YT ZA ZM ZW
"""
#: ISO 3166-1 alpha-2 codes officially assigned.
COUNTRY_CODES = frozenset(_ASSIGNED_COUNTRY_CODES.split())


def require_name(field: str, value: str) -> str:
    """A display name: not blank, at most 200 characters, no control characters."""
    if not value.strip():
        raise v.invalid(field, "is required")
    if len(value) > MAX_NAME_LENGTH:
        raise v.invalid(field, f"is {len(value)} characters; at most {MAX_NAME_LENGTH} are allowed")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise v.invalid(field, "must not contain control characters")
    return value


def require_email(field: str, value: str) -> str:
    """A contact address of the shape local@domain.tld, at most 254 characters."""
    if not value:
        raise v.invalid(field, "is required")
    if len(value) > MAX_EMAIL_LENGTH:
        raise v.invalid(
            field, f"is {len(value)} characters; at most {MAX_EMAIL_LENGTH} are allowed"
        )
    if not _EMAIL.fullmatch(value):  # match() and $ let a trailing newline in
        raise v.invalid(field, f"{v.quote(value)} is not an email address (name@example.com)")
    return value


def require_country(field: str, value: str) -> str:
    """An assigned ISO 3166-1 alpha-2 code in upper case (``DE``, ``US``)."""
    if value not in COUNTRY_CODES:
        raise v.invalid(field, f"{v.quote(value)} is not an ISO 3166-1 alpha-2 country code")
    return value


def optional_webhook_url(field: str, value: str) -> str:
    """Empty, or an absolute https URL (plain http only to a loopback host, for development)."""
    if not value:
        return value
    if len(value) > MAX_URL_LENGTH:
        raise v.invalid(field, f"is {len(value)} characters; at most {MAX_URL_LENGTH} are allowed")
    try:
        url = urllib.parse.urlsplit(value)
        host = url.hostname or ""
        url.port  # noqa: B018  # parsing the port is the check: it raises if malformed
    except ValueError as exc:
        raise v.invalid(field, f"{v.quote(value)} is not a URL") from exc
    if not host or any(char.isspace() for char in value):
        raise v.invalid(field, f"{v.quote(value)} is not an absolute URL with a host")
    if url.scheme == "https" or (url.scheme == "http" and host in _LOOPBACK_HOSTS):
        return value
    raise v.invalid(field, f"must be an https URL (got scheme {url.scheme!r})")
