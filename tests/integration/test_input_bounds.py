"""Every string field of every request is bounded, and bad input comes back quoted short.

Each service runs through the real bootstrap on loopback. For every RPC its proto declares,
a valid request gets one string field (found by walking the request's descriptor, so a new
field is covered the day it is added) replaced by a value far above any limit: the answer
must be INVALID_ARGUMENT naming that field, with a status small enough to read. Every List
RPC must refuse forged, tampered, oversized and deeply nested page tokens the same way.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from interceptors.errors import MAX_MESSAGE_BYTES, MAX_STATUS_BYTES, STATUS_DETAILS_KEY
from paymesh.common.v1 import common_pb2
from services.mesh import page_tokens, pki
from services.mesh.authz import grants
from services.mesh.topology import SERVICES, Topology, env_prefix
from tests.integration.tenants import Tenant, merchant_directory
from tests.servers import ServedAddress, error_reason, mesh_channel, public_channel, running_service

#: Far above every field limit (the largest, a notification payload, is 64 KiB) and the
#: 16 KiB a peer accepts in trailers, yet under the servers' 256 KiB message limit.
HUGE = "x" * 100_000
#: A port nothing listens on: downstreams and partners are unreachable, never a real mesh.
NOWHERE = "127.0.0.1:1"
CALL_TIMEOUT_S = 10.0

#: Each service's start module, as the topology names it.
BUILDERS = {spec.name: f"{spec.module}.__main__" for spec in SERVICES}

_MONEY = {"amountMinor": "1250", "currencyCode": "EUR"}
_ACCOUNT = "merchants/m_1/available"
#: A valid request per RPC (JSON); an RPC not listed starts from its empty request.
VALID: Mapping[str, Mapping[str, Any]] = {
    "PostTransaction": {
        "requestId": "r_1",
        "transactionId": "txn_1",
        "kind": "TRANSACTION_KIND_ADJUSTMENT",
        "referenceId": "pay_1",
        "description": "adjustment",
        "postings": [
            {"accountId": _ACCOUNT, "direction": "ENTRY_DIRECTION_DEBIT", "amount": _MONEY},
            {"accountId": "platform/fees", "direction": "ENTRY_DIRECTION_CREDIT", "amount": _MONEY},
        ],
        "nonNegativeAccountIds": [_ACCOUNT],
    },
    "GetTransaction": {"transactionId": "txn_1"},
    "ListEntries": {"accountId": _ACCOUNT, "currencyCode": "EUR"},
    "GetBalance": {"accountId": _ACCOUNT, "currencyCode": "EUR"},
    "ListBalances": {"merchantId": "m_1"},
    "RecordEvent": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "eventType": "EVENT_TYPE_PAYMENT_SUCCEEDED",
        "paymentId": "pay_1",
        "amount": _MONEY,
    },
    "GetMerchantStats": {"merchantId": "m_1"},
    "ListEvents": {"merchantId": "m_1"},
    "Charge": {
        "requestId": "r_1",
        "paymentId": "pay_1",
        "merchantId": "m_1",
        "amount": _MONEY,
        "settlementCurrencyCode": "EUR",
        "paymentMethodToken": "tok_visa",
    },
    "RefundCharge": {"requestId": "r_1", "chargeId": "ch_1", "amount": _MONEY, "reason": "r"},
    "VoidCharge": {"requestId": "r_1", "chargeId": "ch_1", "reason": "r"},
    "GetCharge": {"chargeId": "ch_1"},
    "ListCharges": {"paymentId": "pay_1"},
    "GetExchangeRate": {"sourceCurrencyCode": "EUR", "targetCurrencyCode": "USD"},
    "CreateMerchant": {
        "requestId": "r_1",
        "name": "Shop",
        "email": "shop@example.com",
        "countryCode": "DE",
        "defaultCurrencyCode": "EUR",
        "webhookUrl": "https://example.com/hook",
    },
    "GetMerchant": {"merchantId": "m_1"},
    "UpdateMerchantStatus": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "status": "MERCHANT_STATUS_SUSPENDED",
        "reason": "fraud",
    },
    "GetMerchantDashboard": {"merchantId": "m_1"},
    "RotateWebhookSecret": {"requestId": "r_1", "merchantId": "m_1"},
    "IssueApiKey": {"requestId": "r_1", "merchantId": "m_1", "label": "ci"},
    "RevokeApiKey": {"requestId": "r_1", "keyId": "key_1", "reason": "leaked"},
    "ListApiKeys": {"merchantId": "m_1"},
    "SendNotification": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "eventType": "payment.succeeded",
        "payloadJson": "{}",
        "webhookUrl": "https://example.com/hook",
    },
    "GetNotification": {"notificationId": "n_1"},
    "RedeliverNotification": {"requestId": "r_1", "notificationId": "n_1"},
    "ListNotifications": {"merchantId": "m_1"},
    "CreateOrder": {
        "requestId": "r_1",
        "orderId": "o_1",
        "merchantId": "m_1",
        "paymentId": "pay_1",
        "amount": _MONEY,
        "merchantOrderReference": "ref",
        "description": "shoes",
    },
    "GetOrder": {"orderId": "o_1"},
    "ListOrders": {"merchantId": "m_1"},
    "UpdateOrderStatus": {
        "requestId": "r_1",
        "orderId": "o_1",
        "status": "ORDER_STATUS_PAID",
        "reason": "paid",
    },
    "CreatePayment": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "amount": _MONEY,
        "settlementCurrencyCode": "EUR",
        "paymentMethodToken": "tok_visa",
        "customerIp": "192.0.2.10",
        "customerCountryCode": "DE",
        "description": "shoes",
        "merchantOrderReference": "ref",
    },
    "GetPayment": {"paymentId": "pay_1"},
    "ListPayments": {"merchantId": "m_1"},
    "RefundPayment": {"requestId": "r_1", "paymentId": "pay_1", "amount": _MONEY, "reason": "r"},
    "GetPaymentSummary": {"merchantId": "m_1"},
    "AssessPayment": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "paymentId": "pay_1",
        "amount": _MONEY,
        "customerIp": "192.0.2.10",
        "customerCountryCode": "DE",
    },
    "GetAssessment": {"assessmentId": "ra_1"},
    "GetRiskSummary": {"merchantId": "m_1"},
    "GetSettleableBalance": {"merchantId": "m_1", "currencyCode": "EUR"},
    "CreateSettlement": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "currencyCode": "EUR",
        "amount": _MONEY,
        "bankAccountReference": "DE89370400440532013000",
    },
    "GetSettlement": {"settlementId": "stl_1"},
    "ListSettlements": {"merchantId": "m_1"},
    "CreateWithdrawal": {
        "requestId": "r_1",
        "merchantId": "m_1",
        "amount": _MONEY,
        "bankAccountReference": "DE89370400440532013000",
        "settlementId": "stl_1",
    },
    "GetWithdrawal": {"withdrawalId": "wd_1"},
    "ListWithdrawals": {"merchantId": "m_1"},
}
#: The batch RPCs: their repeated field of single requests, and the single RPC. A bad item is
#: no failed call but a FAILED result, its status the single call's (field paths in the item).
BATCHES = {
    "RecordEvents": ("events", "RecordEvent"),
    "UpdateOrderStatuses": ("updates", "UpdateOrderStatus"),
    "SendNotifications": ("notifications", "SendNotification"),
}
VALID = {
    **VALID,
    **{batch: {field: [VALID[single]]} for batch, (field, single) in BATCHES.items()},
}


@dataclass(frozen=True, slots=True)
class Step:
    """One field on the way to a string: its name and, if repeated, the element's index."""

    name: str
    index: int | None = None


def _string_paths(
    descriptor: Descriptor, message: Message, depth: int = 0
) -> Iterator[tuple[Step, ...]]:
    """Every string field reachable in ``message``'s type (first element of repeated ones)."""
    for field in descriptor.fields:
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            yield (Step(field.name, len(getattr(message, field.name)) if repeated else None),)
        elif field.message_type is not None and depth < 3:
            child_type = field.message_type
            assert not child_type.GetOptions().map_entry, "add map fields to the walk"
            if repeated:
                elements = getattr(message, field.name)
                child = elements[0] if elements else message_factory.GetMessageClass(child_type)()
                step = Step(field.name, 0)
            else:
                child, step = getattr(message, field.name), Step(field.name)
            for rest in _string_paths(child_type, child, depth + 1):
                yield (step, *rest)


def _with_huge(message: Message, path: tuple[Step, ...]) -> Message:
    changed = type(message)()
    changed.CopyFrom(message)
    target: Any = changed
    for step in path[:-1]:
        target = getattr(target, step.name)
        if step.index is not None:
            while len(target) <= step.index:
                target.add()
            target = target[step.index]
    last = path[-1]
    if last.index is None:
        setattr(target, last.name, HUGE)
    else:
        getattr(target, last.name).append(HUGE)
    return changed


def _display(path: tuple[Step, ...]) -> str:
    return ".".join(s.name if s.index is None else f"{s.name}[{s.index}]" for s in path)


def _without_indexes(field_path: str) -> str:
    return re.sub(r"\[[^\]]*\]", "", field_path)


def _methods(name: str) -> list[tuple[str, MethodDescriptor]]:
    spec = Topology(environ={}).service(name)
    pool = descriptor_pool.Default()
    return [
        (service, method)
        for service in spec.proto_services
        for method in pool.FindServiceByName(service).methods
    ]


@dataclass(frozen=True, slots=True)
class Caller:
    """How to call one method: the channel, its metadata, and the merchant it acts for."""

    channel: aio.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    merchant_id: str = ""
    """The calling merchant's id (on a public port), else empty: a mesh caller."""


class Callers:
    """For each method a caller the topology admits: a granted mesh identity, else (for a
    merchant-only method) a merchant with an API key on the public port."""

    def __init__(self, address: ServedAddress, name: str, tenant: Tenant | None) -> None:
        self._address = address
        self._granted = grants(Topology(environ={}), name)
        self._tenant = tenant
        self._channels: dict[str, aio.Channel] = {}

    def caller(self, service: str, method: MethodDescriptor) -> Caller:
        allowed = self._granted.get(f"/{service}/{method.name}")
        if not allowed:
            assert self._tenant is not None, f"{method.name} is merchant-only: onboard one"
            return Caller(
                self._opened("merchant", lambda: public_channel(self._address.public)),
                self._tenant.key,
                self._tenant.merchant_id,
            )
        who = pki.OPERATOR if pki.OPERATOR in allowed else sorted(allowed)[0]
        return Caller(self._opened(who, lambda: mesh_channel(self._address, as_=who)))

    def _opened(self, key: str, open_channel: Callable[[], aio.Channel]) -> aio.Channel:
        if key not in self._channels:
            self._channels[key] = open_channel()
        return self._channels[key]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _merchant_only(name: str) -> bool:
    return not all(grants(Topology(environ={}), name).values())


@contextlib.asynccontextmanager
async def serving(name: str, var_dir: Path) -> AsyncIterator[Callers]:
    """``name`` running with every other downstream unreachable, and callers of it.

    A service with merchant-only methods also gets merchant-service and merchant-auth, and
    one onboarded merchant to call them as.
    """
    build = importlib.import_module(BUILDERS[name]).build
    environ = _environ(name, var_dir)
    async with contextlib.AsyncExitStack() as stack:
        tenant = None
        if _merchant_only(name):
            directory = await stack.enter_async_context(merchant_directory(var_dir))
            tenant = await directory.onboard()
            environ |= directory.environ
        address = await stack.enter_async_context(running_service(name, build, environ=environ))
        callers = Callers(address, name, tenant)
        stack.push_async_callback(callers.close)
        yield callers


def _valid(method: MethodDescriptor, caller: Caller) -> Message:
    """The valid request of ``method``, for the merchant ``caller`` acts as."""
    request = json_format.ParseDict(
        dict(VALID.get(method.name, {})), message_factory.GetMessageClass(method.input_type)()
    )
    if caller.merchant_id and "merchant_id" in method.input_type.fields_by_name:
        request.merchant_id = caller.merchant_id  # type: ignore[attr-defined]
    return request


def _expected(field_path: str, caller: Caller) -> grpc.StatusCode:
    if caller.merchant_id and field_path == "merchant_id":
        return grpc.StatusCode.NOT_FOUND  # another merchant's id, never a hint it exists
    return grpc.StatusCode.INVALID_ARGUMENT


def _environ(name: str, var_dir: Path) -> dict[str, str]:
    environ = {f"{env_prefix(other)}_ADDR": NOWHERE for other in BUILDERS if other != name}
    environ |= {"PAYMESH_VAR_DIR": str(var_dir), "PARTNER_SANDBOX_ADDR": NOWHERE}
    return environ


async def _call(
    caller: Caller, service: str, method: MethodDescriptor, request: Message
) -> aio.AioRpcError | None:
    output = message_factory.GetMessageClass(method.output_type)
    call = caller.channel.unary_unary(
        f"/{service}/{method.name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=output.FromString,
    )
    try:
        reply = await call(request, timeout=CALL_TIMEOUT_S, metadata=caller.metadata)
    except aio.AioRpcError as error:
        return error
    if method.name in BATCHES:
        (result,) = reply.results  # type: ignore[attr-defined]  # every batch response's
        if result.outcome == common_pb2.BATCH_ITEM_OUTCOME_FAILED:
            # The item's status as the failed single call it stands for.
            status = status_pb2.Status.FromString(result.error.SerializeToString())
            trailing = aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString()))
            return aio.AioRpcError(_CODES[status.code], aio.Metadata(), trailing, status.message)
    return None


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status(error: aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


def _violations(status: status_pb2.Status) -> list[str]:
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return fields


def _problem(
    error: aio.AioRpcError | None, expected: grpc.StatusCode, field_path: str
) -> str | None:
    """Why an answer to an oversized ``field_path`` is wrong, or ``None`` if it is right."""
    if error is None:
        return "accepted"
    if error.code() != expected:
        return f"{error.code().name}: {(error.details() or '')[:120]}"
    if len((error.details() or "").encode()) > MAX_MESSAGE_BYTES or HUGE[:1000] in (
        error.details() or ""
    ):
        return f"message of {len(error.details() or '')} characters echoes the input"
    status = _status(error)
    if status.ByteSize() > MAX_STATUS_BYTES:
        return f"status of {status.ByteSize()} bytes"
    if expected == grpc.StatusCode.INVALID_ARGUMENT and _without_indexes(field_path) not in [
        _without_indexes(field) for field in _violations(status)
    ]:
        return f"field violations {_violations(status)} do not name it"
    return None


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_oversized_string_field_is_invalid_argument_quoted_short(
    name: str, tmp_path: Path
) -> None:
    problems: list[str] = []
    checked = 0
    async with serving(name, tmp_path) as callers:
        for service, method in _methods(name):
            caller = callers.caller(service, method)
            valid = _valid(method, caller)
            for path in _string_paths(method.input_type, valid):
                field_path = _display(path)
                error = await _call(caller, service, method, _with_huge(valid, path))
                checked += 1
                if method.name in BATCHES:  # the item's own path
                    field_path = field_path.split(".", 1)[1]
                problem = _problem(error, _expected(field_path, caller), field_path)
                if problem is not None:
                    problems.append(f"{method.name}.{field_path}: {problem}")
    assert checked, f"{name} has no string fields to check"
    assert not problems, "unbounded or badly reported fields:\n" + "\n".join(problems)


def _deeply_nested() -> str:
    return base64.urlsafe_b64encode(b"[" * 10_000 + b"]" * 10_000).decode()


def _unsigned() -> str:
    raw = b'{"f": {"merchant_id": "m_1"}, "p": {"t": 1, "id": "x"}}'
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _foreign_key() -> str:
    codec = page_tokens.PageTokenCodec(key=b"not-this-deployment-key-" * 2)
    return codec.encode({"t": 1, "id": "x"}, {"merchant_id": "m_1"})


BAD_TOKENS = {
    "deeply nested JSON": _deeply_nested(),
    "oversized": "A" * (page_tokens.MAX_TOKEN_LENGTH + 1),
    "unsigned JSON": _unsigned(),
    "signed with another key": _foreign_key(),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_forged_page_token_is_page_token_invalid_on_every_list_rpc(
    name: str, tmp_path: Path
) -> None:
    problems: list[str] = []
    checked = 0
    async with serving(name, tmp_path) as callers:
        for service, method in _methods(name):
            if "page_token" not in method.input_type.fields_by_name:
                continue
            caller = callers.caller(service, method)
            for kind, token in BAD_TOKENS.items():
                request = _valid(method, caller)
                request.page_token = token  # type: ignore[attr-defined]
                error = await _call(caller, service, method, request)
                checked += 1
                problem = _problem(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")
                reason = error_reason(error) if error is not None else ""
                if problem is None and reason != "PAGE_TOKEN_INVALID":
                    problem = f"reason {reason}"
                if problem is not None:
                    problems.append(f"{method.name} with a {kind} token: {problem}")
    if not checked:
        pytest.skip(f"{name} has no List RPC")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "method_name"),
    [("risk-service", "AssessPayment"), ("payment-gateway", "CreatePayment")],
)
async def test_address_with_an_oversized_zone_is_invalid_argument(
    name: str, method_name: str, tmp_path: Path
) -> None:
    # ipaddress accepts 'fe80::1%<zone>' with a zone of any length.
    async with serving(name, tmp_path) as callers:
        ((service, method),) = [(s, m) for s, m in _methods(name) if m.name == method_name]
        caller = callers.caller(service, method)
        request = _valid(method, caller)
        request.customer_ip = "fe80::1%" + HUGE  # type: ignore[attr-defined]
        error = await _call(caller, service, method, request)
    assert _problem(error, grpc.StatusCode.INVALID_ARGUMENT, "customer_ip") is None
