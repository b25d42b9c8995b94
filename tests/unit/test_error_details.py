"""services.tools.error_details turns buf curl's base64 error details into readable JSON."""

from __future__ import annotations

import base64
import json

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from services.tools.error_details import decode_detail, rewrite


def _wire(type_name: str, payload: bytes) -> dict[str, str]:
    """A detail as Connect prints it: base64 without padding."""
    return {"type": type_name, "value": base64.b64encode(payload).decode().rstrip("=")}


def test_retry_info_is_decoded_with_its_duration() -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000))

    decoded = decode_detail(_wire("google.rpc.RetryInfo", retry.SerializeToString()))

    assert decoded == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.500s"}


def test_unknown_type_and_broken_value_are_kept_as_they_came() -> None:
    unknown = _wire("acme.v1.Secret", b"\x08\x01")
    broken = {"type": "google.rpc.ErrorInfo", "value": "not base64!"}
    garbage = _wire("google.rpc.ErrorInfo", b"\xff\xff\xff")

    assert decode_detail(unknown) == unknown
    assert decode_detail(broken) == broken
    assert decode_detail(garbage) == garbage


def test_rewrite_decodes_the_error_and_keeps_the_text_around_it() -> None:
    info = error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain="order-service")
    error = {
        "code": "not_found",
        "details": [_wire("google.rpc.ErrorInfo", info.SerializeToString())],
    }
    text = f"buf: warning\n{json.dumps(error)}\ntrailing {{ not json\n"

    out = rewrite(text)

    assert out.startswith("buf: warning\n") and out.endswith("\ntrailing { not json\n")
    body = json.loads(out[len("buf: warning\n") : out.index("\ntrailing")])
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "NOT_FOUND",
            "domain": "order-service",
        }
    ]


def test_json_without_details_passes_unchanged() -> None:
    text = '{\n   "orders": []\n}\n'

    assert rewrite(text) == text
