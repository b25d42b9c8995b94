"""Reflection finds the file of every kind of symbol, and serves v1 as v1alpha renamed."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

from services.mesh import reflection

ORDER_FILE = "paymesh/order/v1/order.proto"


def _pool() -> descriptor_pool.DescriptorPool:
    """A pool with order.proto's types and a file declaring an extension of one of them."""
    from paymesh.order.v1 import order_pb2

    pool = descriptor_pool.DescriptorPool()
    _add(pool, order_pb2.DESCRIPTOR)
    _add(pool, descriptor_pb2.DESCRIPTOR)
    extension = descriptor_pb2.FileDescriptorProto(
        name="testing/options.proto",
        package="testing",
        syntax="proto2",
        dependency=["google/protobuf/descriptor.proto"],
        extension=[
            descriptor_pb2.FieldDescriptorProto(
                name="audited",
                number=50001,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                extendee=".google.protobuf.MethodOptions",
            )
        ],
    )
    pool.Add(extension)
    return pool


def _add(pool: descriptor_pool.DescriptorPool, file: object) -> None:
    for dependency in file.dependencies:  # type: ignore[attr-defined]  # a FileDescriptor
        _add(pool, dependency)
    try:
        pool.FindFileByName(file.name)  # type: ignore[attr-defined]  # as above
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)  # type: ignore[attr-defined]  # as above
        pool.Add(proto)


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("paymesh.order.v1.OrderService", ORDER_FILE),
        ("paymesh.order.v1.OrderService.GetOrder", ORDER_FILE),
        ("paymesh.order.v1.Order", ORDER_FILE),
        ("paymesh.order.v1.Order.order_id", ORDER_FILE),
        ("paymesh.order.v1.OrderStatus", ORDER_FILE),
        ("paymesh.order.v1.ORDER_STATUS_UNSPECIFIED", ORDER_FILE),
        ("paymesh.order.v1.OrderStatus.ORDER_STATUS_UNSPECIFIED", ORDER_FILE),
        ("testing.audited", "testing/options.proto"),
    ],
    ids=[
        "service",
        "method",
        "message",
        "field",
        "enum",
        "enum-value",
        "enum-scoped-value",
        "extension",
    ],
)
def test_file_of_every_kind_of_symbol_is_found(symbol: str, file: str) -> None:
    assert reflection.file_containing(_pool(), symbol).name == file


@pytest.mark.parametrize(
    "symbol",
    [
        "paymesh.order.v1.OrderService.DropOrders",
        "paymesh.order.v1.Order.no_such_field",
        "paymesh.order.v1.OrderStatus.ORDER_STATUS_LOST",
        "paymesh.nothing.v1.Nothing",
        "",
    ],
)
def test_unknown_symbol_is_not_found(symbol: str) -> None:
    with pytest.raises(KeyError):
        reflection.file_containing(_pool(), symbol)


def test_v1_is_v1alpha_field_for_field_under_its_own_package() -> None:
    pool = descriptor_pool.DescriptorPool()
    reflection.ensure_v1_descriptor(pool)
    reflection.ensure_v1_descriptor(pool)  # a second time changes nothing
    v1 = pool.FindServiceByName(reflection.V1)
    alpha = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    assert v1.file.name == reflection.V1_FILE
    (method,) = v1.methods
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    for message in reflection_pb2.DESCRIPTOR.message_types_by_name.values():
        renamed = pool.FindMessageTypeByName(f"grpc.reflection.v1.{message.name}")
        assert [(f.name, f.number, f.type) for f in renamed.fields] == [
            (f.name, f.number, f.type) for f in message.fields
        ]
    assert alpha.methods[0].name == method.name


def test_error_details_are_in_the_default_pool_for_clients_to_decode() -> None:
    pool = descriptor_pool.Default()
    for name in ("google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo"):
        assert reflection.file_containing(pool, name).name == "google/rpc/error_details.proto"
