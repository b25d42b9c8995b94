"""The topology and the served descriptors agree: what services/README.md promises a newcomer.

Each topology entry names a generated module in gen/; its services are what the running
service serves (reflection lists them, health knows them, reflection describes exactly the
methods the topology's method paths hold); every method a grant names exists there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from paymesh.order.v1 import order_pb2_grpc
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc
from services.mesh import pki, reflection
from services.mesh.authz import DIAGNOSTICS_METHOD, grants, method_paths
from services.mesh.bootstrap import Registration, StartupError, registrations_for, serve
from services.mesh.diagnostics import DIAGNOSTICS_SERVICE
from services.mesh.tls import PKI_DIR_VAR, TransportSecurity
from services.mesh.topology import (
    ALL_METHODS,
    PARTNERS,
    SERVICES,
    Partner,
    ServiceSpec,
    Target,
    Topology,
    generated_module,
)
from services.order.servicer import OrderServicer
from services.tools.ports import free_port
from tests.integration.harness import ScriptedServicer
from tests.servers import mesh_channel, running_service

ROOT = Path(__file__).resolve().parents[2]
HEALTH = "grpc.health.v1.Health"
#: Nothing listens here: a downstream call fails fast, off the mesh.
NOWHERE = "127.0.0.1:9"


def test_the_constants_are_the_declared_names() -> None:
    assert [s.name for s in SERVICES] == list(Target)
    assert [p.name for p in PARTNERS] == list(Partner)


@pytest.mark.parametrize("spec", SERVICES, ids=[s.name for s in SERVICES])
def test_entry_names_a_generated_module_of_gen_with_servicer_bases(spec: ServiceSpec) -> None:
    module = generated_module(spec.proto)
    assert Path(str(module.__file__)).is_relative_to(ROOT / "gen"), module.__file__
    stubs = importlib.import_module(f"{spec.proto}_grpc")
    assert spec.proto_services
    for full_name in spec.proto_services:
        short = full_name.rsplit(".", 1)[1]
        assert hasattr(stubs, f"{short}Servicer"), full_name
        assert hasattr(stubs, f"add_{short}Servicer_to_server"), full_name
    assert importlib.util.find_spec(f"{spec.module}.__main__") is not None


@pytest.mark.parametrize("spec", SERVICES, ids=[s.name for s in SERVICES])
def test_every_granted_method_exists_in_the_descriptors(spec: ServiceSpec) -> None:
    served = method_paths(spec, ALL_METHODS)
    granted = [m for caller in SERVICES for m in caller.calls.get(spec.name, ())]
    for names in (granted, spec.operator_methods, spec.merchant_methods):
        if names and tuple(names) != ALL_METHODS:
            assert method_paths(spec, names) <= served  # raises on a name it does not serve
    assert set(grants(Topology(environ={}), spec.name)) == served | {DIAGNOSTICS_METHOD}


async def _reflect(
    address: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    async with mesh_channel(address) as channel:
        call = channel.stream_stream(
            f"/{reflection.V1}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return [reply async for reply in call(iter(requests))]


def _methods_described(
    reply: reflection_pb2.ServerReflectionResponse, full_service: str
) -> set[str]:
    """Method paths of ``full_service`` in a file_descriptor_response."""
    package, _, name = full_service.rpartition(".")
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        if file.package != package:
            continue
        for service in file.service:
            if service.name == name:
                return {f"/{full_service}/{m.name}" for m in service.method}
    raise AssertionError(f"{full_service} is not in the described files")


@contextlib.asynccontextmanager
async def _serving(spec: ServiceSpec, var_dir: Path) -> AsyncIterator[str]:
    """The service with its own builder; every downstream and partner unreachable."""
    environ = {"PAYMESH_VAR_DIR": str(var_dir), "PARTNER_SANDBOX_ADDR": NOWHERE}
    for other in SERVICES:
        if other.name != spec.name:
            environ[other.addr_var] = NOWHERE
    module = importlib.import_module(f"{spec.module}.__main__")
    async with running_service(spec.name, module.build, environ=environ) as address:
        yield address


@pytest.mark.parametrize("spec", SERVICES, ids=[s.name for s in SERVICES])
async def test_served_services_and_methods_are_the_topologys(
    spec: ServiceSpec, tmp_path: Path
) -> None:
    async with _serving(spec, tmp_path) as address:
        listed, *described = await _reflect(
            address,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            *(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                for name in spec.proto_services
            ),
        )
        async with mesh_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    own = set(spec.proto_services)
    assert {s.name for s in listed.list_services_response.service} == own | {
        HEALTH,
        DIAGNOSTICS_SERVICE,
        reflection.V1,
        reflection.V1ALPHA,
    }
    assert set(health.statuses) == {"", *own}
    served = set()
    for name, reply in zip(spec.proto_services, described, strict=True):
        served |= _methods_described(reply, name)
    assert served == method_paths(spec, ALL_METHODS)


def test_a_servicer_of_no_generated_service_stops_start_up() -> None:
    spec = Topology(environ={}).service(Target.ORDER)
    with pytest.raises(StartupError, match=r"implements no service of paymesh\.order\.v1"):
        registrations_for(spec, [object()])


def test_a_declared_service_left_unserved_stops_start_up() -> None:
    spec = Topology(environ={}).service(Target.ORDER)
    with pytest.raises(StartupError, match="must serve"):
        registrations_for(spec, [])


def test_a_servicer_is_registered_under_its_descriptors_names() -> None:
    spec = Topology(environ={}).service(Target.ORDER)
    servicer = OrderServicer.__new__(OrderServicer)  # registration never touches its store
    extra = Registration(servicer=object(), add_to_server=lambda s, server: None, service_name="x")
    (own, kept) = registrations_for(spec, [servicer, extra])
    assert own.service_name == "paymesh.order.v1.OrderService"
    assert own.add_to_server is order_pb2_grpc.add_OrderServiceServicer_to_server
    assert own.servicer is servicer
    assert kept is extra


async def test_a_twelfth_service_is_one_servicer_and_one_topology_entry(tmp_path: Path) -> None:
    """Only a servicer and an entry: start-up derives registration, health, reflection and
    authorization from the entry's generated module."""
    twelfth = ServiceSpec(
        name="testing-service",
        module="tests.integration.harness",
        port=free_port(),  # declared, as every entry's; the environment below says where
        admin_port=free_port(),
        proto="paymesh.testing.v1.testing_pb2",
        operator_methods=("Read",),
    )
    pki_dir = tmp_path / "pki"
    pki.ensure_dev_pki(pki_dir, [*(s.name for s in SERVICES), twelfth.name, pki.OPERATOR])
    environ = {
        "TESTING_SERVICE_ADDR": "127.0.0.1:0",
        "TESTING_SERVICE_ADMIN_ADDR": "127.0.0.1:0",
        "PAYMESH_VAR_DIR": str(tmp_path),
        PKI_DIR_VAR: str(pki_dir),
    }
    topology = Topology(services=(*SERVICES, twelfth), environ=environ)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(
            twelfth.name,
            lambda context: [ScriptedServicer()],
            topology=topology,
            grace_s=1.0,
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    operator = TransportSecurity.from_environ(pki.OPERATOR, {PKI_DIR_VAR: str(pki_dir)})
    try:
        address = await asyncio.wait_for(ready, timeout=30)
        async with aio.secure_channel(address, operator.channel_credentials()) as channel:
            health = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
            stub = testing_pb2_grpc.TestServiceStub(channel)
            await stub.Read(testing_pb2.ReadRequest(), timeout=10)
            with pytest.raises(aio.AioRpcError) as denied:
                await stub.Write(testing_pb2.WriteRequest(), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)
    assert set(health.statuses) == {"", "paymesh.testing.v1.TestService"}
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
