"""Decode the error details that ``buf curl`` prints as base64, for a person to read.

buf curl writes a failed call as Connect's error JSON and decodes a detail only when its type
is compiled into the buf binary (google.rpc.Status, Duration...), never through reflection, so
ErrorInfo, BadRequest and RetryInfo stay base64. Pipe its output through this module
(``buf curl ... 2>&1 | python -m services.tools.error_details``): each detail becomes its
protobuf JSON with ``@type``, as grpcurl prints it. Lines that are not such JSON pass unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from typing import Any, TextIO

from google.protobuf import any_pb2, json_format, message
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  # registers the detail types

TYPE_URL_PREFIX = "type.googleapis.com/"


def decode_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """One Connect wire detail (``type``, base64 ``value``) as protobuf JSON with ``@type``.

    A detail of a type this process does not know, or with a broken value, is returned as it
    came: showing the bytes beats hiding the detail.
    """
    type_name, value = detail.get("type"), detail.get("value")
    if not isinstance(type_name, str) or not isinstance(value, str):
        return detail
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except binascii.Error:
        return detail
    packed = any_pb2.Any(type_url=TYPE_URL_PREFIX + type_name.rpartition("/")[2], value=raw)
    try:
        decoded: dict[str, Any] = json_format.MessageToDict(packed)
    except (TypeError, json_format.Error, message.DecodeError):  # unknown type, broken bytes
        return detail
    return decoded


def decode_error(error: dict[str, Any]) -> dict[str, Any]:
    """Connect's error JSON with every detail decoded."""
    details = error.get("details")
    if not isinstance(details, list):
        return error
    return error | {"details": [decode_detail(d) if isinstance(d, dict) else d for d in details]}


def rewrite(text: str) -> str:
    """``text`` with each top-level JSON object that has ``details`` decoded and re-indented."""
    out: list[str] = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(text):
        start = text.find("{", position)
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            out.append(text[position : start + 1])
            position = start + 1
            continue
        out.append(text[position:start])
        if isinstance(value, dict) and "details" in value:
            out.append(json.dumps(decode_error(value), indent=3, ensure_ascii=False))
        else:
            out.append(text[start:end])
        position = end
    out.append(text[position:])
    return "".join(out)


def main(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Filter stdin to stdout."""
    stdout.write(rewrite(stdin.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
