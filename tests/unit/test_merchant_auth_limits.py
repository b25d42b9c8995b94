"""merchant-auth's verification limits on a fake clock: windows, lock exemptions, bounds, config."""

from __future__ import annotations

import dataclasses

import pytest

from services.merchant_auth.config import LIMIT_VARS, AuthConfig
from services.merchant_auth.limits import (
    FailureWindow,
    InFlightLimit,
    KnownPeers,
    Refusal,
    VerificationGuard,
    VerificationLimits,
    client_peer,
    peer_address,
)
from services.mesh.bootstrap import StartupError
from tests.unit.fakes import FakeClock


def _window(clock: FakeClock, *, limit: int = 3, max_subjects: int = 100) -> FailureWindow:
    return FailureWindow(limit=limit, window_s=60, max_subjects=max_subjects, clock=clock)


# --- Defaults -------------------------------------------------------------------------------


def test_every_limit_has_a_safe_default() -> None:
    assert VerificationLimits() == VerificationLimits(
        max_in_flight=16,
        overload_retry_s=0.1,
        key_failures=10,
        peer_failures=20,
        window_s=60.0,
        known_peer_s=86_400.0,
        max_tracked=10_000,
        max_known_peers_per_key=16,
    )


@pytest.mark.parametrize(
    "change",
    [{"max_in_flight": 0}, {"key_failures": 0}, {"window_s": 0}, {"overload_retry_s": -1}],
)
def test_a_limit_below_its_minimum_is_refused(change: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        dataclasses.replace(VerificationLimits(), **change)  # type: ignore[arg-type]


# --- Failure windows ------------------------------------------------------------------------


def test_a_subject_is_locked_once_its_failures_reach_the_limit_within_the_window() -> None:
    clock = FakeClock()
    window = _window(clock)
    assert window.record("k") is False
    assert window.record("k") is False
    assert window.retry_after_s("k") is None
    assert window.record("k") is True
    assert window.retry_after_s("k") == pytest.approx(60)


def test_the_retry_delay_is_the_time_until_the_oldest_failure_leaves_the_window() -> None:
    clock = FakeClock()
    window = _window(clock)
    for _ in range(3):
        window.record("k")
        clock.advance(10)
    assert window.retry_after_s("k") == pytest.approx(30)  # first at 0, now 30, window 60
    clock.advance(30)
    assert window.retry_after_s("k") is None  # one failure left the window: below the limit
    window.record("k")
    assert window.retry_after_s("k") == pytest.approx(10)  # the second (at 10) is oldest now


def test_failures_spread_wider_than_the_window_never_lock() -> None:
    clock = FakeClock()
    window = _window(clock)
    for _ in range(10):
        window.record("k")
        clock.advance(30)
    assert window.retry_after_s("k") is None


def test_subjects_are_counted_apart() -> None:
    clock = FakeClock()
    window = _window(clock, limit=1)
    window.record("a")
    assert window.retry_after_s("a") is not None
    assert window.retry_after_s("b") is None


def test_the_longest_quiet_subject_is_forgotten_beyond_the_bound() -> None:
    clock = FakeClock()
    window = _window(clock, limit=1, max_subjects=2)
    for subject in ("a", "b", "c"):
        window.record(subject)
    assert len(window) == 2
    assert window.retry_after_s("a") is None
    assert window.retry_after_s("c") is not None


def test_expired_subjects_are_dropped_when_others_fail() -> None:
    clock = FakeClock()
    window = _window(clock)
    window.record("old")
    clock.advance(60)
    window.record("new")
    assert len(window) == 1


# --- Known peers and in-flight slots ---------------------------------------------------------


def test_a_peer_is_known_for_its_key_within_the_ttl_only() -> None:
    clock = FakeClock()
    known = KnownPeers(ttl_s=100, max_keys=10, max_per_key=4, clock=clock)
    known.remember("key_a", "192.0.2.1")
    assert known.knows("key_a", "192.0.2.1")
    assert not known.knows("key_b", "192.0.2.1")
    assert not known.knows("key_a", "192.0.2.2")
    clock.advance(100)
    assert not known.knows("key_a", "192.0.2.1")


def test_known_peers_are_bounded_per_key_and_in_total() -> None:
    clock = FakeClock()
    known = KnownPeers(ttl_s=100, max_keys=2, max_per_key=2, clock=clock)
    for peer in ("p1", "p2", "p3"):
        known.remember("key_a", peer)
    assert not known.knows("key_a", "p1")
    assert known.knows("key_a", "p3")
    known.remember("key_b", "p1")
    known.remember("key_c", "p1")
    assert not known.knows("key_a", "p3")
    assert known.knows("key_c", "p1")


def test_a_zero_ttl_knows_no_peer() -> None:
    known = KnownPeers(ttl_s=0, max_keys=2, max_per_key=2, clock=FakeClock())
    known.remember("key_a", "p1")
    assert not known.knows("key_a", "p1")


def test_in_flight_slots_refuse_beyond_the_limit_and_come_back() -> None:
    slots = InFlightLimit(2)
    assert slots.try_start() and slots.try_start()
    assert not slots.try_start()
    assert slots.running == 2
    slots.finish()
    assert slots.try_start()


# --- The guard ------------------------------------------------------------------------------


def _guard(clock: FakeClock, **limits: float) -> VerificationGuard:
    return VerificationGuard(
        dataclasses.replace(VerificationLimits(key_failures=2, peer_failures=3), **limits),  # type: ignore[arg-type]
        clock=clock,
    )


def test_a_locked_key_refuses_unknown_peers_but_not_one_that_proved_it_holds_the_key() -> None:
    clock = FakeClock()
    guard = _guard(clock)
    guard.succeeded(peer="merchant", key_id="key_a")
    guard.failed(peer="attacker-1", key_id="key_a")
    guard.failed(peer="attacker-2", key_id="key_a")
    assert guard.refusal(peer="attacker-3", key_id="key_a") == Refusal(
        subject="key_id", retry_after_s=60
    )
    assert guard.refusal(peer="merchant", key_id="key_a") is None
    assert guard.refusal(peer="attacker-3", key_id="key_b") is None


def test_a_locked_peer_is_refused_for_any_key_even_one_it_holds() -> None:
    guard = _guard(FakeClock())
    guard.succeeded(peer="p", key_id="key_a")
    for _ in range(3):
        guard.failed(peer="p", key_id=None)
    assert guard.refusal(peer="p", key_id="key_a") == Refusal(subject="peer", retry_after_s=60)
    assert guard.refusal(peer="p", key_id=None) == Refusal(subject="peer", retry_after_s=60)
    assert guard.refusal(peer="q", key_id="key_a") is None


def test_failures_of_unknown_key_ids_count_against_the_peer_only() -> None:
    guard = _guard(FakeClock())
    guard.failed(peer="p1", key_id=None)
    guard.failed(peer="p2", key_id=None)
    assert guard.refusal(peer="p3", key_id="key_unknown") is None


def test_successes_never_count_against_a_limit() -> None:
    guard = _guard(FakeClock())
    for _ in range(50):
        guard.succeeded(peer="p", key_id="key_a")
    assert guard.refusal(peer="q", key_id="key_a") is None
    assert guard.refusal(peer="p", key_id="key_a") is None


# --- Peers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:198.51.100.7:40000", "198.51.100.7"),
        ("198.51.100.7:1", "198.51.100.7"),
        ("198.51.100.7", "198.51.100.7"),
        ("ipv6:%5B2001:db8:1:2:3:4:5:6%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::1]:443", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("ipv6:%5B::ffff:198.51.100.7%5D:443", "198.51.100.7"),
        ("unix:/run/paymesh.sock", "unix:/run/paymesh.sock"),
        ("x" * 500, "x" * 128),
    ],
)
def test_a_peer_is_its_address_without_port_and_ipv6_by_its_64(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_the_forwarded_peer_wins_over_the_connection() -> None:
    assert client_peer("ipv4:192.0.2.10:5", "ipv4:10.0.0.3:6") == "192.0.2.10"
    assert client_peer(None, "ipv4:10.0.0.3:6") == "10.0.0.3"
    assert client_peer("  ", "ipv4:10.0.0.3:6") == "10.0.0.3"


# --- Configuration --------------------------------------------------------------------------


def test_without_settings_the_defaults_apply() -> None:
    config = AuthConfig.from_environ({})
    assert config.limits == VerificationLimits()
    assert config.pepper_file is None


def test_every_exposed_limit_is_read_from_its_variable() -> None:
    environ = {variable: "7" for variable in LIMIT_VARS.values()}
    environ["MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE"] = "/run/secrets/pepper"
    config = AuthConfig.from_environ(environ)
    for field in LIMIT_VARS:
        assert getattr(config.limits, field) == 7
    assert str(config.pepper_file) == "/run/secrets/pepper"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "ten", "is not an integer"),
        ("MERCHANT_AUTH_SERVICE_KEY_FAILURE_LIMIT", "2.5", "is not an integer"),
        ("MERCHANT_AUTH_SERVICE_PEER_FAILURE_LIMIT", "0", "at least 1"),
        ("MERCHANT_AUTH_SERVICE_MAX_VERIFICATIONS_IN_FLIGHT", "-4", "at least 1"),
        ("MERCHANT_AUTH_SERVICE_FAILURE_WINDOW_S", "0", "at least 0.001"),
        ("MERCHANT_AUTH_SERVICE_FAILURE_WINDOW_S", "nan", "at least 0.001"),
        ("MERCHANT_AUTH_SERVICE_OVERLOAD_RETRY_S", "soon", "is not a number"),
        ("MERCHANT_AUTH_SERVICE_KNOWN_PEER_S", "-1", "at least 0"),
        ("MERCHANT_AUTH_SERVICE_MAX_TRACKED", "0", "at least 1"),
        ("MERCHANT_AUTH_SERVICE_KEY_PEPPER_FILE", " ", "set but empty"),
    ],
)
def test_a_bad_setting_is_a_startup_error_naming_its_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(StartupError, match=variable) as caught:
        AuthConfig.from_environ({variable: value})
    assert message in str(caught.value)
