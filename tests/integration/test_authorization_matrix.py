"""Every caller x every method of every service, against the real servers, versus the topology.

Each service runs through the real bootstrap on mTLS; each mesh identity (the ten other
services and the operator) calls every method of it with an empty request, and a caller
without a certificate calls its merchant-facing port. A cell the topology grants must get
past authorization (any other outcome: a validation error, an unreachable downstream...);
a cell it does not grant must be PERMISSION_DENIED with reason CALLER_NOT_AUTHORIZED naming
caller and method. The expectation is read from the topology's declarations here, not from
the code that enforces them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc import aio

from services.mesh import pki
from services.mesh.topology import ALL_METHODS, SERVICES, ServiceSpec
from tests.servers import ServedAddress, error_reason, mesh_channel, public_channel, running_service

DIAGNOSTICS = "/paymesh.mesh.v1.DiagnosticsService/GetDiagnostics"
#: Nothing listens here: downstream calls of an admitted request fail fast, off the mesh.
NOWHERE = "127.0.0.1:9"


def _methods(spec: ServiceSpec) -> list[tuple[str, type]]:
    """(path, request class) of every method the service serves, Diagnostics included."""
    pool = descriptor_pool.Default()
    out = []
    for full in (*spec.proto_services, "paymesh.mesh.v1.DiagnosticsService"):
        package = full.rsplit(".", 1)[0]
        importlib.import_module(f"{package}.{package.split('.')[1]}_pb2")
        for method in pool.FindServiceByName(full).methods:
            request = message_factory.GetMessageClass(method.input_type)
            out.append((f"/{full}/{method.name}", request))
    return out


def _expected(target: ServiceSpec, path: str, caller: str) -> bool:
    """Whether the topology, as declared, grants ``caller`` the method ``path`` of ``target``."""
    method = path.rsplit("/", 1)[1]
    if path == DIAGNOSTICS:
        return caller == pki.OPERATOR
    if caller == pki.OPERATOR:
        return method in target.operator_methods
    granted = next(s for s in SERVICES if s.name == caller).calls.get(target.name, ())
    return tuple(granted) == ALL_METHODS or method in granted


async def _outcome(channel: aio.Channel, path: str, request: type) -> tuple[grpc.StatusCode, str]:
    call: aio.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
        path,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )
    try:
        await call(request(), timeout=10)
    except aio.AioRpcError as exc:
        return exc.code(), error_reason(exc)
    return grpc.StatusCode.OK, ""


@contextlib.asynccontextmanager
async def _serving(spec: ServiceSpec, var_dir: Path) -> AsyncIterator[ServedAddress]:
    environ = {"PAYMESH_VAR_DIR": str(var_dir), "PARTNER_SANDBOX_ADDR": NOWHERE}
    for other in SERVICES:
        if other.name != spec.name:
            environ[other.addr_var] = NOWHERE
    module = importlib.import_module(f"{spec.module}.__main__")
    async with running_service(spec.name, module.build, environ=environ) as address:
        yield address


@pytest.mark.parametrize("target", SERVICES, ids=[s.name for s in SERVICES])
async def test_every_caller_gets_exactly_what_the_topology_grants(
    target: ServiceSpec, tmp_path: Path
) -> None:
    callers = [*(s.name for s in SERVICES), pki.OPERATOR]
    wrong: list[str] = []
    async with _serving(target, tmp_path) as address:
        for caller in callers:
            async with mesh_channel(address, as_=caller) as channel:
                for path, request in _methods(target):
                    code, reason = await _outcome(channel, path, request)
                    denied = reason == "CALLER_NOT_AUTHORIZED"
                    if denied and code != grpc.StatusCode.PERMISSION_DENIED:
                        wrong.append(f"{caller} {path}: reason {reason} with {code.name}")
                    if denied == _expected(target, path, caller):
                        wrong.append(
                            f"{caller} -> {path}: {'denied' if denied else 'admitted'} "
                            f"({code.name} {reason}), topology says "
                            f"{'grant' if _expected(target, path, caller) else 'deny'}"
                        )
        if address.public:
            async with public_channel(address.public) as channel:
                for path, request in _methods(target):
                    code, reason = await _outcome(channel, path, request)
                    merchant_facing = path.rsplit("/", 1)[1] in target.merchant_methods
                    if merchant_facing and reason != "CREDENTIALS_MISSING":
                        wrong.append(f"public {path}: merchant method without key got {reason}")
                    if not merchant_facing and code != grpc.StatusCode.UNAUTHENTICATED:
                        wrong.append(f"public {path}: internal method reachable ({code.name})")
    assert not wrong, "\n".join(wrong)


def test_every_granted_method_exists() -> None:
    names = {s.name for s in SERVICES}
    for caller in SERVICES:
        for target_name, methods in caller.calls.items():
            assert target_name in names
            target = next(s for s in SERVICES if s.name == target_name)
            served = {p.rsplit("/", 1)[1] for p, _ in _methods(target)}
            assert tuple(methods) == ALL_METHODS or set(methods) <= served, (caller.name, methods)
    for spec in SERVICES:
        served = {p.rsplit("/", 1)[1] for p, _ in _methods(spec)}
        assert set(spec.operator_methods) <= served, spec.name
        assert set(spec.merchant_methods) <= served, spec.name
