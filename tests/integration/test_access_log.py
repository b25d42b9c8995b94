"""The access log of a real server: failed calls always, successful ones only at DEBUG or sampled.

A line for every successful call cost more CPU than the rest of the server interceptor, so at
the default level a success writes (and formats) nothing; a failure is written at INFO when it
is the caller's (NOT_FOUND) and WARNING when it is the service's (UNAVAILABLE).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest

from paymesh.testing.v1 import testing_pb2 as pb
from services.mesh.errors import NotFound, Unavailable
from services.mesh.logs import JsonFormatter
from tests.integration.harness import ScriptedServicer, make_chain, serving, stub_for

ACCESS = "paymesh.access"


class _Refusing(ScriptedServicer):
    """Answers Read; fails Write with the domain error its text names."""

    async def Write(self, request: Any, context: Any) -> pb.WriteResponse:
        if request.text == "missing":
            raise NotFound("no such thing")
        raise Unavailable("the ledger is away")


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


async def _calls(*, sample: float = 0.0) -> None:
    """One successful Read, one Write failing NOT_FOUND, one failing UNAVAILABLE."""
    async with serving(_Refusing(), access_log_sample=sample) as server:
        async with stub_for(make_chain({"retry": {"max_attempts": 1}}), server.address) as stub:
            await stub.Read(pb.ReadRequest(text="x"))
            for text in ("missing", "away"):
                with pytest.raises(grpc.RpcError):
                    await stub.Write(pb.WriteRequest(text=text, request_id=f"r-{text}"))


async def test_successful_calls_write_no_line_at_info_but_failed_ones_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)

    await _calls()

    lines = {(r.method, r.code, r.levelno) for r in _access(caplog)}  # type: ignore[attr-defined]
    assert lines == {
        ("/paymesh.testing.v1.TestService/Write", "NOT_FOUND", logging.INFO),
        ("/paymesh.testing.v1.TestService/Write", "UNAVAILABLE", logging.WARNING),
    }


async def test_successful_calls_are_written_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS)

    await _calls()

    (ok,) = [r for r in _access(caplog) if r.code == "OK"]  # type: ignore[attr-defined]
    assert ok.levelno == logging.DEBUG
    assert ok.method == "/paymesh.testing.v1.TestService/Read"  # type: ignore[attr-defined]
    assert ok.duration_ms >= 0  # type: ignore[attr-defined]
    assert "rpc method=/paymesh.testing.v1.TestService/Read code=OK" in ok.getMessage()


async def test_a_sample_of_1_writes_every_successful_call_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)

    await _calls(sample=1.0)

    assert [r.levelno for r in _access(caplog) if r.code == "OK"] == [logging.INFO]  # type: ignore[attr-defined]


async def test_an_access_line_in_json_carries_method_code_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)

    await _calls()

    record = next(r for r in _access(caplog) if r.code == "UNAVAILABLE")  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter("test-service").format(record))
    assert line["level"] == "WARNING"
    assert line["service"] == "test-service"
    assert line["method"] == "/paymesh.testing.v1.TestService/Write"
    assert line["code"] == "UNAVAILABLE"
    assert isinstance(line["duration_ms"], float)
    assert "the ledger is away" in line["message"]
