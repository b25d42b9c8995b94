"""PolicyConfig: defaults, per-target and per-method overrides, validation naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptors.policy import (
    DEFAULT_POLICY_FILE,
    POLICY_FILE_VAR,
    CallPolicy,
    PolicyConfig,
    PolicyError,
    RetryPolicy,
    partner_route,
)

METHOD = "/paymesh.order.v1.OrderService/GetOrder"


def test_seed_defaults_match_the_issue() -> None:
    policy = CallPolicy()
    assert (policy.retry.max_attempts, policy.retry.initial_backoff_s) == (4, 0.05)
    assert (policy.retry.backoff_multiplier, policy.retry.max_backoff_s) == (2.0, 1.0)
    assert (policy.breaker.minimum_calls, policy.breaker.failure_rate) == (5, 0.6)
    assert (policy.breaker.window_s, policy.breaker.open_s) == (60.0, 30.0)
    assert policy.breaker.half_open_calls == 3
    assert policy.budget.retry_ratio == 0.2


def test_target_overrides_defaults() -> None:
    config = PolicyConfig.from_mapping(
        {"defaults": {"timeout_s": 3.0}, "targets": {"order-service": {"timeout_s": 1.0}}}
    )
    assert config.policy_for("order-service", METHOD).timeout_s == 1.0
    assert config.policy_for("risk-service", METHOD).timeout_s == 3.0


def test_method_overrides_target() -> None:
    config = PolicyConfig.from_mapping(
        {
            "targets": {"order-service": {"timeout_s": 1.0, "retry": {"max_attempts": 2}}},
            "methods": {METHOD: {"timeout_s": 0.2}},
        }
    )
    policy = config.policy_for("order-service", METHOD)
    assert (policy.timeout_s, policy.retry.max_attempts) == (0.2, 2)


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"targets": {"order-service": {"retry": {"max_atempts": 2}}}})
    assert caught.value.key == "targets.order-service.retry.max_atempts"


def test_unknown_top_level_key_is_refused() -> None:
    with pytest.raises(PolicyError, match="defualts"):
        PolicyConfig.from_mapping({"defualts": {}})


def test_negative_timeout_names_its_path() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"defaults": {"timeout_s": -1}})
    assert caught.value.key == "defaults.timeout_s"


def test_max_attempts_below_one_names_its_path() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"methods": {METHOD: {"retry": {"max_attempts": 0}}}})
    assert caught.value.key == f"methods.{METHOD}.retry.max_attempts"


def test_breaker_per_method_is_refused() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"methods": {METHOD: {"breaker": {"open_s": 1}}}})
    assert caught.value.key == f"methods.{METHOD}.breaker"


def test_wrong_type_is_refused() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"defaults": {"timeout_s": "5s"}})
    assert caught.value.key == "defaults.timeout_s"


def test_unknown_target_is_refused_when_targets_are_known() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping(
            {"targets": {"oder-service": {}}}, known_targets={"order-service"}
        )
    assert caught.value.key == "targets.oder-service"


def test_retry_policy_validates_in_post_init() -> None:
    with pytest.raises(PolicyError):
        RetryPolicy(max_attempts=0)


def test_default_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POLICY_FILE_VAR, raising=False)
    config = PolicyConfig.load()
    assert DEFAULT_POLICY_FILE.exists()
    assert config.defaults.retry.max_attempts == 4


def test_env_var_points_at_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[defaults]\ntimeout_s = 1.5\n")
    monkeypatch.setenv(POLICY_FILE_VAR, str(path))
    assert PolicyConfig.load().defaults.timeout_s == 1.5


def test_bad_file_error_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[defaults.retry]\nmax_attempts = 0\n")
    with pytest.raises(PolicyError, match=r"defaults\.retry\.max_attempts.*policy\.toml"):
        PolicyConfig.load(str(path))


def test_hang_detection_defaults() -> None:
    breaker = CallPolicy().breaker
    assert breaker.consecutive_failures == 5
    assert (breaker.slow_call_duration_s, breaker.slow_call_rate) == (2.5, 0.6)
    assert (breaker.slow_call_window_calls, breaker.max_concurrent_calls) == (5, 100)


def test_deployed_file_keeps_the_defaults_and_gives_partners_more_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(POLICY_FILE_VAR, raising=False)
    config = PolicyConfig.load()
    assert config.defaults.breaker == CallPolicy().breaker
    assert config.target_policy("bank-transfer").breaker.slow_call_duration_s == 5.0
    assert config.target_policy("merchant-webhooks").breaker.slow_call_duration_s == 5.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("consecutive_failures", 0),
        ("slow_call_duration_s", 0),
        ("slow_call_rate", 0),
        ("slow_call_rate", 1.5),
        ("window_buckets", 0),
        ("slow_call_window_calls", 0),
        ("max_concurrent_calls", 0),
        ("max_concurrent_calls", 1.5),
    ],
)
def test_bad_hang_detection_value_names_its_path(key: str, value: float) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"targets": {"order-service": {"breaker": {key: value}}}})
    assert caught.value.key == f"targets.order-service.breaker.{key}"


def test_concurrency_limit_per_target_overrides_the_default() -> None:
    config = PolicyConfig.from_mapping(
        {"targets": {"order-service": {"breaker": {"max_concurrent_calls": 8}}}}
    )
    assert config.target_policy("order-service").breaker.max_concurrent_calls == 8
    assert config.target_policy("risk-service").breaker.max_concurrent_calls == 100


def test_retryable_codes_are_set_per_method_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f'[methods."{METHOD}".retry]\nretryable_codes = ["UNAVAILABLE", "INTERNAL"]\n')
    config = PolicyConfig.load(str(path))
    assert config.policy_for("order-service", METHOD).retry.retryable_codes == {
        "UNAVAILABLE",
        "INTERNAL",
    }
    assert config.defaults.retry.retryable_codes == {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def test_unknown_retryable_code_names_its_path() -> None:
    with pytest.raises(PolicyError, match="UNAVAILBLE") as caught:
        PolicyConfig.from_mapping({"defaults": {"retry": {"retryable_codes": ["UNAVAILBLE"]}}})
    assert caught.value.key == "defaults.retry.retryable_codes"


@pytest.mark.parametrize("value", ["UNAVAILABLE", [14], ["OK"]])
def test_retryable_codes_must_be_a_list_of_code_names(value: object) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"defaults": {"retry": {"retryable_codes": value}}})
    assert caught.value.key == "defaults.retry.retryable_codes"


def test_retry_policy_refuses_an_unknown_code_in_code_too() -> None:
    with pytest.raises(PolicyError):
        RetryPolicy(retryable_codes=frozenset({"UNAVAILABLE", "TRY_AGAIN"}))


R = "/charges/:id/void"
PARTNER_ROUTE = "/payment-channel/POST /charges/:id/void"


def test_a_partner_route_is_a_method_of_the_methods_table() -> None:
    config = PolicyConfig.from_mapping(
        {"methods": {PARTNER_ROUTE: {"timeout_s": 2.0, "retry": {"max_attempts": 1}}}}
    )
    policy = config.policy_for("payment-channel", partner_route("payment-channel", "post", R))
    assert (policy.timeout_s, policy.retry.max_attempts) == (2.0, 1)
    assert config.policy_for("payment-channel", "/payment-channel/GET /charges").timeout_s == 5.0


@pytest.mark.parametrize(
    "name",
    [
        "/payment-channel/FETCH /charges",  # no such verb
        "/payment-channel/GET charges",  # the path is not absolute
        "/payment-channel/",
        "/paymesh.order.v1.OrderService/Get/Order",
        "paymesh.order.v1.OrderService/GetOrder",
    ],
)
def test_a_misspelt_method_or_route_is_refused(name: str) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyConfig.from_mapping({"methods": {name: {"timeout_s": 1.0}}})
    assert caught.value.key == f"methods.{name}"
