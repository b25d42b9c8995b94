"""buf curl as a user runs it: the real binary, over mTLS as the operator, schema from reflection.

buf curl decodes an error detail only when its type is compiled into buf (google.rpc.Status,
Duration...), never through reflection, so our ErrorInfo and BadRequest come out base64;
piped through ``services.tools.error_details`` (as the README shows) they read as grpcurl's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from services.mesh import pki
from tests import servers

BUF = Path(sys.executable).parent / "buf"
ORDER = "paymesh.order.v1.OrderService"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"

pytestmark = pytest.mark.skipif(
    not BUF.exists(),
    reason="buf not found next to the interpreter (the dev extras install buf-bin)",
)


async def _run(*command: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _buf_curl(address: str, method: str, body: str) -> tuple[int, str, str]:
    """``buf curl`` of ``ORDER/method`` with the test PKI's operator certificate."""
    files = servers.identity(pki.OPERATOR).files
    assert files is not None
    return await _run(
        str(BUF),
        "curl",
        "--protocol",
        "grpc",
        "--cacert",
        str(files.ca),
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
        "-d",
        body,
        f"https://{address}/{ORDER}/{method}",
    )


async def _filter(printed: str) -> str:
    """What buf curl printed, through ``python -m services.tools.error_details``."""
    code, out, err = await _run(
        sys.executable, "-m", "services.tools.error_details", stdin=printed.encode()
    )
    assert code == 0, err
    return out


async def _decoded(printed: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(await _filter(printed))
    return decoded


async def test_not_found_prints_its_error_info_decoded(order_service: str) -> None:
    code, _, printed = await _buf_curl(order_service, "GetOrder", '{"order_id": "ord_missing"}')

    assert code == 5 * 8, printed  # buf curl exits with the gRPC code times eight
    raw = json.loads(printed)
    assert raw["details"][0]["type"] == "google.rpc.ErrorInfo"
    assert "debug" not in raw["details"][0]  # buf alone: base64 only, hence the filter
    decoded = await _decoded(printed)
    assert decoded["code"] == "not_found"
    assert decoded["message"] == "order 'ord_missing' does not exist"
    assert decoded["details"] == [
        {
            "@type": ERROR_INFO,
            "reason": "NOT_FOUND",
            "domain": "order-service",
            "metadata": {"order_id": "ord_missing"},
        }
    ]


async def test_invalid_argument_prints_its_bad_request_decoded(order_service: str) -> None:
    code, _, printed = await _buf_curl(order_service, "GetOrder", "{}")

    assert code == 3 * 8, printed
    decoded = await _decoded(printed)
    assert decoded["code"] == "invalid_argument"
    assert decoded["details"] == [
        {"@type": ERROR_INFO, "reason": "VALIDATION_FAILED", "domain": "order-service"},
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "order_id", "description": "is required"}],
        },
    ]


async def test_a_successful_answer_passes_the_filter_unchanged(order_service: str) -> None:
    code, out, err = await _buf_curl(order_service, "ListOrders", "{}")

    assert code == 0, err
    assert json.loads(await _filter(out)) == json.loads(out)
