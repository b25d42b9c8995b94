"""The client error family and method safety from the descriptor pool."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2
from grpc import aio

from interceptors.errors import CallError, circuit_open_error, error_info
from interceptors.safety import method_is_idempotent, request_is_safe
from paymesh.testing.v1 import testing_pb2 as pb

SERVICE = "/paymesh.testing.v1.TestService"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_call_error_is_an_aio_rpc_error_with_the_chain_facts() -> None:
    error = CallError(
        grpc.StatusCode.UNAVAILABLE,
        "down",
        target="order-service",
        method=f"{SERVICE}/Read",
        attempts=4,
        stop_reason="attempts_exhausted",
    )
    assert isinstance(error, aio.AioRpcError)
    assert (error.code(), error.details(), error.attempts) == (
        grpc.StatusCode.UNAVAILABLE,
        "down",
        4,
    )
    assert "order-service" in str(error)


def test_unknown_stop_reason_is_refused() -> None:
    with pytest.raises(ValueError):
        CallError(
            grpc.StatusCode.UNAVAILABLE, "", target="t", method="m", attempts=1, stop_reason="x"
        )


def test_circuit_open_error_carries_error_info_naming_the_target() -> None:
    error = circuit_open_error(caller="gw", target="order-service", method="m", retry_after_s=3)
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    info = error_info(status_pb2.Status.FromString(details))
    assert info is not None
    assert (error.code(), info.reason, info.metadata["target"]) == (
        grpc.StatusCode.UNAVAILABLE,
        "CIRCUIT_OPEN",
        "order-service",
    )


def test_no_side_effects_method_is_safe() -> None:
    assert method_is_idempotent(f"{SERVICE}/Read")


def test_method_without_option_is_not_safe() -> None:
    assert not method_is_idempotent(f"{SERVICE}/WriteUnsafe")


def test_unknown_method_is_not_safe() -> None:
    assert not method_is_idempotent("/nowhere.v1.Nothing/Do")


def test_request_id_makes_a_call_safe() -> None:
    assert request_is_safe(f"{SERVICE}/Write", pb.WriteRequest(request_id="r-1"))
    assert not request_is_safe(f"{SERVICE}/Write", pb.WriteRequest())
