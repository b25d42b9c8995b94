"""Server reflection as real clients use it: v1 and v1alpha, every kind of symbol resolvable.

grpcio-reflection finds a symbol's file with the pool's ``FindFileContainingSymbol``, which
does not know methods (grpc/grpc#34743), so ``grpcurl describe pkg.Service.Method`` fails with
"Symbol not found"; and it ships only v1alpha. :class:`MeshReflectionServicer` resolves
services, methods, messages, fields, oneofs, enums, enum values and extensions, and is served
under both ``grpc.reflection.v1alpha`` and ``grpc.reflection.v1`` (listed, and describable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

#: The reflection services this module serves, newest first.
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_FILE = "grpc/reflection/v1/reflection.proto"
#: Files a client needs to decode our error details (google.rpc.Status, ErrorInfo,
#: BadRequest, RetryInfo, ...): importing them puts them into the default pool.
ERROR_DETAIL_FILES = tuple(m.DESCRIPTOR.name for m in (status_pb2, error_details_pb2, code_pb2))


def ensure_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add ``grpc.reflection.v1`` to ``pool``: v1alpha renamed, as the two are field for field
    the same protocol (grpcio-reflection 1.85 ships only v1alpha's descriptor). A pool that
    already has the file (a later grpcio-reflection's own v1 module imported first) is kept."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{reflection_pb2.DESCRIPTOR.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's are deprecated=true and its Java/Go packages
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name:  # set for message fields only
                message_field.type_name = message_field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    pool.Add(proto)


def file_containing(pool: descriptor_pool.DescriptorPool, symbol: str) -> FileDescriptor:
    """The file that declares ``symbol``, whatever kind of symbol it is.

    Enum values are found both as protobuf scopes them (``pkg.Message.VALUE``, siblings of
    their enum) and qualified by their enum (``pkg.Message.Enum.VALUE``).

    Raises:
        KeyError: no such symbol in the pool.
    """
    try:
        return pool.FindFileContainingSymbol(symbol)
    except KeyError:
        pass
    finders: tuple[Callable[[str], Any], ...] = (
        pool.FindMethodByName,
        pool.FindExtensionByName,
        pool.FindOneofByName,
    )
    for find in finders:
        try:
            found = find(symbol)
        except KeyError:
            continue
        return _file_of(found)
    parent, _, child = symbol.rpartition(".")
    if parent and child:
        containers: tuple[tuple[Callable[[str], Any], str], ...] = (
            (pool.FindServiceByName, "methods_by_name"),
            (pool.FindMessageTypeByName, "fields_by_name"),
            (pool.FindEnumTypeByName, "values_by_name"),
        )
        for find_parent, members in containers:
            try:
                container = find_parent(parent)
            except KeyError:
                continue
            if child in getattr(container, members):
                return _file_of(container)
    raise KeyError(f"symbol not found: {symbol}")


def _file_of(descriptor: Any) -> FileDescriptor:
    """A method's file is its service's; everything else knows its own."""
    if getattr(descriptor, "file", None) is not None:
        return descriptor.file  # type: ignore[no-any-return]  # descriptors are untyped here
    return descriptor.containing_service.file  # type: ignore[no-any-return]  # as above


class MeshReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # untyped base
    """grpcio-reflection's aio servicer with every symbol kind resolvable."""

    def __init__(
        self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        pool = pool or descriptor_pool.Default()
        ensure_v1_descriptor(pool)
        super().__init__(service_names, pool=pool)

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        try:
            descriptor = file_containing(self._pool, fully_qualified_name)
        except KeyError:
            return reflection_pb2.ServerReflectionResponse(
                error_response=reflection_pb2.ErrorResponse(
                    error_code=grpc.StatusCode.NOT_FOUND.value[0],
                    error_message=f"symbol not found: {fully_qualified_name}",
                ),
                original_request=request,
            )
        return self._file_by_filename(request, descriptor.name)  # the file and its imports


def add_to_server(
    server: aio.Server,
    service_names: Sequence[str],
    pool: descriptor_pool.DescriptorPool | None = None,
) -> MeshReflectionServicer:
    """Serve reflection of ``service_names`` (and of both reflection services) on ``server``.

    v1's messages are v1alpha's field for field, so one servicer answers both; grpcurl and
    buf curl ask v1 first.
    """
    servicer = MeshReflectionServicer((*service_names, V1, V1ALPHA), pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handler = grpc.method_handlers_generic_handler(
        V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1_handler,))
    return servicer
