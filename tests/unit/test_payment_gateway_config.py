"""payment-gateway's settings and its classification of downstream failures."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from interceptors.errors import STATUS_DETAILS_KEY, rich_status
from services.bootstrap import StartupError
from services.payment_gateway.config import CHARGE_CUTOFF_VAR, RECOVERY_INTERVAL_VAR, GatewayConfig
from services.payment_gateway.flow import is_transient, reason_of


def test_defaults_apply_without_variables() -> None:
    assert GatewayConfig.from_environ({}) == GatewayConfig()


def test_variables_override_the_defaults() -> None:
    config = GatewayConfig.from_environ({RECOVERY_INTERVAL_VAR: "5", CHARGE_CUTOFF_VAR: "60"})
    assert (config.recovery_interval_s, config.charge_cutoff_s) == (5.0, 60.0)


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_bad_value_stops_start_up_naming_the_variable(raw: str) -> None:
    with pytest.raises(StartupError, match=RECOVERY_INTERVAL_VAR):
        GatewayConfig.from_environ({RECOVERY_INTERVAL_VAR: raw})


def _error(code: grpc.StatusCode, reason: str | None = None) -> aio.AioRpcError:
    trailing = aio.Metadata()
    if reason is not None:
        status = rich_status(code, "boom", domain="x", reason=reason)
        trailing = aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString()))
    return aio.AioRpcError(code, aio.Metadata(), trailing, "boom")


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
    error = _error(grpc.StatusCode.FAILED_PRECONDITION, "EXCHANGE_RATE_UNAVAILABLE")
    assert reason_of(error) == "EXCHANGE_RATE_UNAVAILABLE"
    assert reason_of(_error(grpc.StatusCode.UNAVAILABLE)) == "DOWNSTREAM_UNAVAILABLE"
