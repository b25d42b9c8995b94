"""Every reason on the wire is a value of paymesh.common.v1.ErrorReason.

Reasons are written as :class:`interceptors.errors.Reason` members, which only exist for values
of the proto enum; this test also reads the source of services/ and interceptors/ for reasons
written as string literals, in every place a reason goes, so none slips past as a plain string.
"""

from __future__ import annotations

import ast
import enum
import re
from pathlib import Path
from typing import cast

import grpc
import pytest

from interceptors import codes
from interceptors.errors import REASON_PREFIX, Reason, rich_status
from paymesh.common.v1 import common_pb2
from services.mesh.errors import NotFound

ROOT = Path(__file__).resolve().parents[2]
#: Where code that puts reasons on the wire lives (tools only read them).
SOURCES = [ROOT / "interceptors", *(p for p in (ROOT / "services").iterdir() if p.name != "tools")]
#: Parameters and fields that hold an ErrorReason name.
REASON_NAMES = frozenset({"reason", "default_reason", "failure_reason", "decline_reason"})
#: A literal shaped like an ErrorReason name (free text such as "payment succeeded" is not).
REASON_SHAPE = re.compile(r"^[A-Z][A-Z0-9_]*$")
PROTO_REASONS = frozenset(
    name.removeprefix(REASON_PREFIX)
    for name in common_pb2.ErrorReason.keys()  # noqa: SIM118  # an enum wrapper, not a dict
    if name != f"{REASON_PREFIX}UNSPECIFIED"
)


def _literal(node: ast.AST | None) -> str | None:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return None
    return node.value if REASON_SHAPE.match(node.value) else None


def reason_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal written where a reason goes."""
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg in REASON_NAMES:
            found.append((node.value.lineno, _literal(node.value)))
        elif isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args]
            pairs = [
                *zip(named[len(named) - len(node.defaults) :], node.defaults, strict=True),
                *zip(node.kwonlyargs, node.kw_defaults, strict=True),
            ]
            found += [(a.lineno, _literal(d)) for a, d in pairs if a.arg in REASON_NAMES]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = getattr(target, "id", getattr(target, "attr", ""))
                if name.endswith("_REASON") or name in REASON_NAMES:
                    found.append((node.lineno, _literal(node.value)))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in {"reason_of", "Reason"}:
            found += [(a.lineno, _literal(a)) for a in node.args[1:]]
    return [(line, text) for line, text in found if text is not None]


def test_reason_members_are_exactly_the_proto_enum() -> None:
    assert {member.value for member in Reason} == PROTO_REASONS
    assert all(member.name == member.value for member in Reason)


def test_a_member_outside_the_proto_enum_cannot_be_written() -> None:
    with pytest.raises(ValueError):

        class Wrong(enum.StrEnum):
            _generate_next_value_ = Reason._generate_next_value_
            NOT_IN_THE_CONTRACT = enum.auto()


def test_a_reason_outside_the_enum_cannot_be_raised_or_sent() -> None:
    unknown = cast(Reason, "NOT_IN_THE_CONTRACT")  # what mypy refuses, at run time
    with pytest.raises(ValueError):
        NotFound("gone", reason=unknown)
    with pytest.raises(ValueError):
        rich_status(grpc.StatusCode.NOT_FOUND, "gone", domain="d", reason=unknown)


def test_every_reason_of_the_codes_table_is_in_the_enum() -> None:
    assert {traits.reason for traits in codes.TABLE.values()} <= PROTO_REASONS


def test_the_scan_finds_reason_literals_wherever_a_reason_goes() -> None:
    source = """
X_REASON = "A"
def f(reason="B", *, failure_reason="C"): ...
raise NotFound("m", reason="D")
class E:
    default_reason = "E"
reason_of(error, "F")
call(reason="free text", stop_reason="G")
"""
    assert sorted(text for _, text in reason_literals(source)) == ["A", "B", "C", "D", "E", "F"]


def test_every_reason_literal_on_the_wire_is_in_the_enum() -> None:
    unknown = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for source_dir in SOURCES
        for path in ([source_dir] if source_dir.is_file() else sorted(source_dir.rglob("*.py")))
        if path.suffix == ".py"
        for line, text in reason_literals(path.read_text())
        if text not in PROTO_REASONS
    ]
    assert unknown == []
