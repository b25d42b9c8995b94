"""The one status-code table: numbers as gRPC's, and a core that never imports gRPC."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from interceptors import codes


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_code_numbers_are_grpcs(code: grpc.StatusCode) -> None:
    assert codes.NUMBERS[code.name] == code.value[0]


def test_http_statuses_map_through_the_table() -> None:
    assert [codes.http_code(s) for s in (200, 404, 429, 503, 418, 599)] == [
        "OK",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "FAILED_PRECONDITION",
        "UNKNOWN",
    ]


def test_the_attempt_loop_and_its_observer_import_no_grpc() -> None:
    probe = (
        "import sys, interceptors.attempts, interceptors.observe, interceptors.policy; "
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
