"""Typed client errors: one class per code, built at one boundary, carrying the ErrorInfo."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from interceptors import codes
from interceptors.errors import (
    ERROR_CLASSES,
    STATUS_DETAILS_KEY,
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    CallError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PartnerCallError,
    PermissionDeniedError,
    Reason,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    circuit_open_error,
    concurrency_limited_error,
    from_grpc_error,
    reason_for_code,
    rich_status,
)
from services.mesh.errors import FieldViolation

#: What each code must become: written out, not derived from ERROR_CLASSES, so a wrong entry
#: there fails here.
EXPECTED = {
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def _rpc_error(
    code: grpc.StatusCode,
    reason: Reason | None = None,
    *,
    metadata: dict[str, str] | None = None,
    field_violations: Sequence[FieldViolation] = (),
    retry_delay_s: float | None = None,
) -> aio.AioRpcError:
    """A failed call as grpc.aio raises it, with the callee's rich status when ``reason``."""
    trailing = aio.Metadata()
    if reason is not None:
        rich = rich_status(
            code,
            "no",
            domain="order-service",
            reason=reason,
            metadata=metadata,
            field_violations=field_violations,
            retry_delay_s=retry_delay_s,
        )
        trailing = aio.Metadata((STATUS_DETAILS_KEY, rich.SerializeToString()))
    return aio.AioRpcError(code, aio.Metadata(), trailing, "no", None)


def test_every_code_but_ok_has_a_class() -> None:
    assert set(ERROR_CLASSES) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(EXPECTED) == set(ERROR_CLASSES)


@pytest.mark.parametrize(("code", "cls"), EXPECTED.items(), ids=lambda x: getattr(x, "name", ""))
def test_from_grpc_error_maps_each_code_to_its_class(
    code: grpc.StatusCode, cls: type[CallError]
) -> None:
    error = from_grpc_error(_rpc_error(code), target="order-service", method="/o.v1.O/Get")
    assert type(error) is cls
    assert (error.grpc_status_code, error.code(), error.details()) == (code, code, "no")
    assert isinstance(error, CallError | aio.AioRpcError | grpc.RpcError)


@pytest.mark.parametrize(("code", "cls"), EXPECTED.items(), ids=lambda x: getattr(x, "name", ""))
def test_call_error_constructor_picks_the_class_of_its_code(
    code: grpc.StatusCode, cls: type[CallError]
) -> None:
    error = CallError(code, "x", target="t", method="m", attempts=2, stop_reason="deadline")
    assert type(error) is cls
    assert (error.attempts, error.stop_reason) == (2, "deadline")


def test_from_grpc_error_carries_reason_domain_metadata_and_details() -> None:
    raw = _rpc_error(
        grpc.StatusCode.NOT_FOUND,
        Reason.PAYMENT_NOT_FOUND,
        metadata={"payment_id": "p_1"},
        field_violations=[FieldViolation("payment_id", "unknown")],
        retry_delay_s=1.5,
    )
    error = from_grpc_error(raw)
    assert isinstance(error, NotFoundError)
    assert error.reason == Reason.PAYMENT_NOT_FOUND
    assert (error.domain, error.metadata) == ("order-service", {"payment_id": "p_1"})
    assert error.retry_delay_s == 1.5
    kinds = [type(detail) for detail in error.status_details]
    assert kinds == [
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    ]
    bad_request = error.status_details[1]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert bad_request.field_violations[0].field == "payment_id"


def test_error_without_a_rich_status_has_no_reason() -> None:
    error = from_grpc_error(_rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert isinstance(error, UnavailableError)
    assert (error.reason, error.domain, error.metadata, error.status_details) == ("", "", {}, ())


def test_from_grpc_error_returns_a_typed_error_as_it_is() -> None:
    error = from_grpc_error(_rpc_error(grpc.StatusCode.ABORTED))
    assert from_grpc_error(error) is error


def test_a_typed_class_refuses_another_code() -> None:
    with pytest.raises(ValueError, match="NOT_FOUND"):
        NotFoundError(
            grpc.StatusCode.UNAVAILABLE,
            "",
            target="t",
            method="m",
            attempts=1,
            stop_reason="deadline",
        )


def test_partner_error_is_both_a_partner_error_and_the_class_of_its_code() -> None:
    error = PartnerCallError(
        grpc.StatusCode.NOT_FOUND,
        "bank: no such account",
        http_status=404,
        target="bank",
        method="POST /transfers",
        attempts=1,
        stop_reason="not_retryable",
    )
    assert isinstance(error, PartnerCallError)
    assert isinstance(error, NotFoundError)
    assert error.http_status == 404


def test_circuit_open_error_is_unavailable_with_reason_circuit_open() -> None:
    error = circuit_open_error(caller="gw", target="order-service", method="m", retry_after_s=3)
    assert isinstance(error, UnavailableError)
    assert (error.reason, error.domain) == (Reason.CIRCUIT_OPEN, "gw")
    assert error.metadata["target"] == "order-service"


@pytest.mark.parametrize("http", [False, True])
def test_concurrency_limited_error_is_unavailable_with_its_reason(http: bool) -> None:
    error = concurrency_limited_error(
        caller="gw", target="bank", method="m", limit=4, retry_after_s=0.5, http=http
    )
    assert isinstance(error, UnavailableError)
    assert isinstance(error, PartnerCallError) is http
    assert (error.reason, error.retry_delay_s) == (Reason.CONCURRENCY_LIMITED, 0.5)


def test_traits_come_from_the_codes_table() -> None:
    error = from_grpc_error(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert error.traits is codes.TABLE["DEADLINE_EXCEEDED"]
    assert error.traits.outcome_unknown


@pytest.mark.parametrize("code", EXPECTED, ids=lambda c: c.name)
def test_every_code_has_a_reason_for_a_status_without_one(code: grpc.StatusCode) -> None:
    assert isinstance(reason_for_code(code), Reason)


def test_code_sets_of_the_services_kept_their_members() -> None:
    # What each set held before it became a column of the table.
    assert {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "UNKNOWN",
        "INTERNAL",
        "CANCELLED",
        "ABORTED",
        "RESOURCE_EXHAUSTED",
    } == codes.OUTCOME_UNKNOWN
    assert codes.OUTCOME_UNKNOWN | {"DATA_LOSS"} == codes.DEPENDENCY_FAULT
    assert {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "NOT_FOUND",
    } == codes.DEFINITE
    assert {"UNAVAILABLE", "DEADLINE_EXCEEDED"} == codes.UNREACHABLE
    assert {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"} == codes.NO_VERDICT
