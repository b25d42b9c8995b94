"""payment-gateway's settings and its classification of downstream failures."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, CallError, Reason, from_grpc_error, rich_status
from services.mesh.bootstrap import StartupError
from services.mesh.downstream import is_ambiguous as is_transient
from services.payment_gateway.config import (
    CHARGE_CUTOFF_VAR,
    OUTBOX_BATCH_ITEMS_VAR,
    OUTBOX_GATHER_VAR,
    OUTBOX_INTERVAL_VAR,
    OUTBOX_MAX_BACKOFF_VAR,
    RECOVERY_INTERVAL_VAR,
    RECOVERY_MAX_BACKOFF_VAR,
    GatewayConfig,
)
from services.payment_gateway.flow import reason_of


def test_defaults_apply_without_variables() -> None:
    config = GatewayConfig.from_environ({})
    assert config == GatewayConfig()
    assert (config.recovery_interval_s, config.recovery_max_backoff_s) == (30.0, 300.0)
    assert (config.outbox_interval_s, config.outbox_max_backoff_s) == (5.0, 60.0)
    assert config.charge_cutoff_s == 900.0


def test_variables_override_the_defaults() -> None:
    config = GatewayConfig.from_environ(
        {
            RECOVERY_INTERVAL_VAR: "5",
            RECOVERY_MAX_BACKOFF_VAR: "40",
            CHARGE_CUTOFF_VAR: "60",
            OUTBOX_INTERVAL_VAR: "2",
            OUTBOX_MAX_BACKOFF_VAR: "20",
        }
    )
    assert (config.recovery_interval_s, config.charge_cutoff_s) == (5.0, 60.0)
    schedule, relay = config.recovery_schedule(), config.relay_policy()
    assert (schedule.interval_s, schedule.max_backoff_s) == (5.0, 40.0)
    assert (relay.interval_s, relay.max_backoff_s) == (2.0, 20.0)


def test_the_relay_batch_size_is_64_rows_unless_set_within_1_to_64() -> None:
    assert GatewayConfig.from_environ({}).relay_policy().batch_items == 64
    assert GatewayConfig.from_environ({OUTBOX_BATCH_ITEMS_VAR: "1"}).relay_policy().batch_items == 1
    for bad in ("0", "65", "-3", "8.5", "many", ""):
        with pytest.raises(StartupError, match=OUTBOX_BATCH_ITEMS_VAR):
            GatewayConfig.from_environ({OUTBOX_BATCH_ITEMS_VAR: bad})


def test_the_relay_gathers_commits_for_50_ms_unless_set_from_0_to_the_interval() -> None:
    assert GatewayConfig.from_environ({}).relay_policy().gather_s == 0.05
    assert GatewayConfig.from_environ({OUTBOX_GATHER_VAR: "0"}).relay_policy().gather_s == 0
    longer = {OUTBOX_GATHER_VAR: "8", OUTBOX_INTERVAL_VAR: "10"}
    assert GatewayConfig.from_environ(longer).relay_policy().gather_s == 8
    for bad in ("-0.01", "6", "nan", "inf", "soon", ""):
        with pytest.raises(StartupError, match=OUTBOX_GATHER_VAR):
            GatewayConfig.from_environ({OUTBOX_GATHER_VAR: bad})


def test_a_backoff_cap_below_the_first_backoff_lowers_the_first_backoff() -> None:
    config = GatewayConfig.from_environ(
        {RECOVERY_MAX_BACKOFF_VAR: "0.2", OUTBOX_MAX_BACKOFF_VAR: "0.1"}
    )
    assert config.recovery_schedule().initial_backoff_s == 0.2
    assert config.relay_policy().initial_backoff_s == 0.1


@pytest.mark.parametrize(
    "var",
    [
        RECOVERY_INTERVAL_VAR,
        RECOVERY_MAX_BACKOFF_VAR,
        CHARGE_CUTOFF_VAR,
        OUTBOX_INTERVAL_VAR,
        OUTBOX_MAX_BACKOFF_VAR,
    ],
)
@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_bad_value_stops_start_up_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(StartupError, match=var):
        GatewayConfig.from_environ({var: raw})


def _error(code: grpc.StatusCode, reason: Reason | None = None) -> CallError:
    """A failed call as the chain raises it, with the callee's ErrorInfo when ``reason``."""
    trailing = aio.Metadata()
    if reason is not None:
        status = rich_status(code, "boom", domain="x", reason=reason)
        trailing = aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString()))
    return from_grpc_error(aio.AioRpcError(code, aio.Metadata(), trailing, "boom"))


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL],
)
def test_unknown_outcomes_are_transient(code: grpc.StatusCode) -> None:
    assert is_transient(_error(code))


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION]
)
def test_definite_answers_are_not_transient(code: grpc.StatusCode) -> None:
    assert not is_transient(_error(code))


def test_reason_comes_from_the_callee_error_info() -> None:
    error = _error(grpc.StatusCode.FAILED_PRECONDITION, Reason.EXCHANGE_RATE_UNAVAILABLE)
    assert reason_of(error) == "EXCHANGE_RATE_UNAVAILABLE"
    assert reason_of(_error(grpc.StatusCode.UNAVAILABLE)) == "DOWNSTREAM_UNAVAILABLE"
