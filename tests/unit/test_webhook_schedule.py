"""The webhook retry schedule and notification-service's delivery settings, with exact numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mesh.bootstrap import StartupError
from services.notification.config import NotificationConfig
from services.notification.delivery import PoolSettings
from services.notification.dispatch import LoopSettings
from services.notification.schedule import DeliverySchedule


def test_defaults_retry_for_three_days_starting_at_ten_seconds_capped_at_an_hour() -> None:
    schedule = DeliverySchedule()
    assert schedule.horizon_s == 3 * 24 * 3600
    assert [schedule.bound_s(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert schedule.bound_s(12) == 3600  # 10 * 2**11 = 20 480, capped
    assert schedule.bound_s(10_000) == 3600  # no overflow however many failures


def test_jitter_takes_off_at_most_half_of_the_bound() -> None:
    schedule = DeliverySchedule()
    assert schedule.delay_s(3, lambda: 0.0) == 40
    assert schedule.delay_s(3, lambda: 0.999999) == pytest.approx(20, abs=1e-4)


def test_next_attempt_is_the_jittered_wait_after_the_failure() -> None:
    schedule = DeliverySchedule()
    at = schedule.next_attempt_time(now=1000.0, round_start=900.0, failures=2, rng=lambda: 0.5)
    assert at == 1000.0 + 20 * 0.75


def test_last_attempt_of_a_round_is_at_its_horizon_then_none() -> None:
    schedule = DeliverySchedule(horizon_s=100.0)
    assert schedule.next_attempt_time(now=95.0, round_start=0.0, failures=5, rng=lambda: 0.0) == 100
    assert (
        schedule.next_attempt_time(now=100.0, round_start=0.0, failures=6, rng=lambda: 0.0) is None
    )


def test_a_redelivery_round_has_its_own_horizon() -> None:
    schedule = DeliverySchedule(horizon_s=100.0)
    at = schedule.next_attempt_time(now=5000.0, round_start=4990.0, failures=1, rng=lambda: 0.0)
    assert at == 5010.0


@pytest.mark.parametrize(
    "changes",
    [
        {"initial_backoff_s": 0},
        {"max_backoff_s": -1},
        {"horizon_s": float("inf")},
        {"initial_backoff_s": 20, "max_backoff_s": 10},
        {"backoff_multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_schedule_refuses_nonsense(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DeliverySchedule(**changes)


def test_settings_default_without_environment(tmp_path: Path) -> None:
    config = NotificationConfig.from_environ({}, tmp_path)
    assert config.schedule == DeliverySchedule()
    assert config.loop == LoopSettings(scan_interval_s=1.0, concurrency=8, inline_wait_s=1.0)
    assert config.pools == PoolSettings(max_pools=64, keepalive_s=4.0)


def test_settings_are_read_from_the_environment(tmp_path: Path) -> None:
    config = NotificationConfig.from_environ(
        {
            "NOTIFICATION_SERVICE_RETRY_INITIAL_S": "2",
            "NOTIFICATION_SERVICE_RETRY_MAX_S": "60",
            "NOTIFICATION_SERVICE_RETRY_HORIZON_S": "86400",
            "NOTIFICATION_SERVICE_DELIVERY_SCAN_S": "0.5",
            "NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY": "3",
            "NOTIFICATION_SERVICE_INLINE_WAIT_S": "0.25",
            "NOTIFICATION_SERVICE_WEBHOOK_POOLS": "5",
            "NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S": "1.5",
        },
        tmp_path,
    )
    assert config.schedule == DeliverySchedule(
        initial_backoff_s=2, max_backoff_s=60, horizon_s=86400
    )
    assert config.loop == LoopSettings(scan_interval_s=0.5, concurrency=3, inline_wait_s=0.25)
    assert config.pools == PoolSettings(max_pools=5, keepalive_s=1.5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NOTIFICATION_SERVICE_RETRY_INITIAL_S", "soon"),
        ("NOTIFICATION_SERVICE_RETRY_HORIZON_S", "0"),
        ("NOTIFICATION_SERVICE_RETRY_MAX_S", "1"),  # below the initial 10 s
        ("NOTIFICATION_SERVICE_DELIVERY_SCAN_S", "-1"),
        ("NOTIFICATION_SERVICE_DELIVERY_CONCURRENCY", "2.5"),
        ("NOTIFICATION_SERVICE_INLINE_WAIT_S", "nan"),
        ("NOTIFICATION_SERVICE_WEBHOOK_POOLS", "0"),
        ("NOTIFICATION_SERVICE_WEBHOOK_POOLS", "many"),
        ("NOTIFICATION_SERVICE_WEBHOOK_POOLS", "1.5"),
        ("NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S", "0"),
        ("NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S", "inf"),
        ("NOTIFICATION_SERVICE_WEBHOOK_KEEPALIVE_S", "long"),
    ],
)
def test_bad_setting_stops_the_start_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(StartupError, match=variable):
        NotificationConfig.from_environ({variable: value}, tmp_path)


@pytest.mark.parametrize("changes", [{"max_pools": 0}, {"keepalive_s": 0}, {"keepalive_s": -1.0}])
def test_pool_settings_refuse_nonsense(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PoolSettings(**changes)  # type: ignore[arg-type]
