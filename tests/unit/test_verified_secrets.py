"""merchant-auth remembers verified secrets briefly so scrypt runs once per key, not per call."""

from __future__ import annotations

from services.merchant_auth.keys import VerifiedSecrets


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_remembered_secret_is_known_good_within_the_ttl() -> None:
    clock = _Clock()
    verified = VerifiedSecrets(ttl_s=10, clock=clock)
    verified.remember("key_1", "sk_secret", "scrypt$hash")
    clock.now = 9.9
    assert verified.known_good("key_1", "sk_secret", "scrypt$hash")


def test_entry_expires_after_the_ttl() -> None:
    clock = _Clock()
    verified = VerifiedSecrets(ttl_s=10, clock=clock)
    verified.remember("key_1", "sk_secret", "scrypt$hash")
    clock.now = 10.0
    assert not verified.known_good("key_1", "sk_secret", "scrypt$hash")


def test_another_secret_for_the_same_key_is_not_known_good() -> None:
    verified = VerifiedSecrets(clock=_Clock())
    verified.remember("key_1", "sk_secret", "scrypt$hash")
    assert not verified.known_good("key_1", "sk_guess", "scrypt$hash")


def test_a_changed_stored_hash_invalidates_the_entry() -> None:
    verified = VerifiedSecrets(clock=_Clock())
    verified.remember("key_1", "sk_secret", "scrypt$old")
    assert not verified.known_good("key_1", "sk_secret", "scrypt$new")


def test_oldest_entries_are_evicted_beyond_the_bound() -> None:
    verified = VerifiedSecrets(max_entries=2, clock=_Clock())
    for index in range(3):
        verified.remember(f"key_{index}", "sk_secret", "scrypt$hash")
    assert not verified.known_good("key_0", "sk_secret", "scrypt$hash")
    assert verified.known_good("key_2", "sk_secret", "scrypt$hash")
