"""The webhook signature scheme: what notification-service signs and what receivers verify."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.notification.signing import (
    SignatureError,
    new_secret,
    sign,
    signature_header,
    verify,
)

SECRET = "whsec_" + "A" * 43
BODY = b'{"event_type": "payment.succeeded", "payload": {"amount_minor": 1250}}'
T = 1_767_000_000


def test_signature_is_hmac_sha256_of_time_dot_body_keyed_with_the_whole_secret() -> None:
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, T) == expected
    assert signature_header([SECRET], BODY, T) == f"t={T},v1={expected}"


def test_header_carries_one_v1_per_secret_current_first() -> None:
    header = signature_header([SECRET, "whsec_old"], BODY, T)
    assert header == f"t={T},v1={sign(SECRET, BODY, T)},v1={sign('whsec_old', BODY, T)}"


def test_any_matching_v1_verifies() -> None:
    header = signature_header(["whsec_new", SECRET], BODY, T)
    verify(SECRET, header, BODY, now=T)
    verify("whsec_new", header, BODY, now=T)


@pytest.mark.parametrize("age_s", [-300, 0, 300])
def test_signature_within_five_minutes_either_way_verifies(age_s: int) -> None:
    verify(SECRET, signature_header([SECRET], BODY, T), BODY, now=T + age_s)


@pytest.mark.parametrize("age_s", [301, 3600, -301])
def test_signature_older_or_newer_than_five_minutes_is_rejected(age_s: int) -> None:
    with pytest.raises(SignatureError, match="more than 300 s"):
        verify(SECRET, signature_header([SECRET], BODY, T), BODY, now=T + age_s)


def test_tolerance_is_a_parameter() -> None:
    header = signature_header([SECRET], BODY, T)
    with pytest.raises(SignatureError):
        verify(SECRET, header, BODY, now=T + 61, tolerance_s=60)


def test_tampered_body_is_rejected() -> None:
    header = signature_header([SECRET], BODY, T)
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify(SECRET, header, BODY.replace(b"1250", b"9250"), now=T)


def test_changed_time_is_rejected() -> None:
    header = signature_header([SECRET], BODY, T).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify(SECRET, header, BODY, now=T)


def test_another_secret_is_rejected() -> None:
    with pytest.raises(SignatureError):
        verify("whsec_other", signature_header([SECRET], BODY, T), BODY, now=T)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v1=abc",
        f"t={T}",
        f"t={T},t={T},v1=abc",
        "t=soon,v1=abc",
        "t=\u00b2,v1=abc",
        f"t={T},v0={'0' * 64}",
        f"t={T},v1=\u00e9",
    ],
)
def test_malformed_header_is_rejected(header: str) -> None:
    with pytest.raises(SignatureError):
        verify(SECRET, header, BODY, now=T)


def test_new_secret_is_whsec_and_256_random_bits() -> None:
    secret = new_secret(token_bytes=lambda n: bytes(range(n)))
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 43
    assert new_secret() != new_secret()
