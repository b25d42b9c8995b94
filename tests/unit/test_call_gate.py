"""The gate's quick path for mesh callers: decided without awaiting, the certificate's SPIFFE id
read once per certificate, the same verdicts as the awaited path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.mesh.authz import CallGate
from services.mesh.errors import PermissionDenied
from services.mesh.topology import Topology

GET_BALANCE = "/paymesh.accounting.v1.AccountingService/GetBalance"
POST_TRANSACTION = "/paymesh.accounting.v1.AccountingService/PostTransaction"


def _spiffe(name: str) -> str:
    return f"spiffe://test/{name}"


class _Peer:
    """A server call's context as the gate reads it: the certificate's SANs and SPIFFE id."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.auth_reads = 0

    def peer_identities(self) -> list[bytes] | None:
        return None if self.name is None else [_spiffe(self.name).encode(), b"localhost"]

    def auth_context(self) -> dict[str, list[bytes]]:
        self.auth_reads += 1
        return {} if self.name is None else {"peer_spiffe_id": [_spiffe(self.name).encode()]}

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()


def _gate() -> CallGate:
    return CallGate(
        service="accounting-service",
        topology=Topology(environ={}),
        spiffe_id_of=_spiffe,
        authenticate=None,
    )


def test_a_granted_mesh_caller_is_admitted_without_awaiting_and_its_id_read_once() -> None:
    gate, peer = _gate(), _Peer("settlement-service")

    first = gate.admit_now(GET_BALANCE, peer)
    second = gate.admit_now(GET_BALANCE, _Peer("settlement-service"))

    assert first is not None and first.caller == "settlement-service"
    assert second is first
    assert peer.auth_reads == 1


def test_an_ungranted_caller_is_denied_on_both_paths() -> None:
    gate = _gate()

    with pytest.raises(PermissionDenied, match="order-service is not granted"):
        gate.admit_now(GET_BALANCE, _Peer("order-service"))
    with pytest.raises(PermissionDenied, match="order-service is not granted"):
        asyncio.run(gate.admit(GET_BALANCE, _Peer("order-service")))


def test_a_caller_without_a_certificate_is_left_to_the_awaited_path() -> None:
    assert _gate().admit_now(POST_TRANSACTION, _Peer(None)) is None
