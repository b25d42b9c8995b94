"""channel-adapter through real gRPC on loopback against the partner sandbox.

Charges are made once per request id whatever is replayed, retried or recovered; a decline
is a DECLINED charge; refunds never exceed the capture; the partner's outage is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from paymesh.channel_adapter.v1 import channel_adapter_pb2 as pb
from paymesh.channel_adapter.v1 import channel_adapter_pb2_grpc as pb_grpc
from paymesh.common.v1 import common_pb2
from services.channel_adapter.__main__ import build
from services.mesh.admin_token import (
    FAULT_INJECTION_VAR,
    ControlAccess,
    admin_authorization,
    with_admin_token,
)
from services.tools.sandbox.app import SandboxState
from tests.servers import ServicesUnderTest, error_info_of, running_sandbox

#: The sandbox's address, state and the headers that open its fault switches.
Sandbox = tuple[str, SandboxState, dict[str, str]]


@dataclass
class Adapter:
    stub: pb_grpc.ChannelAdapterServiceAsyncStub
    sandbox: str
    state: SandboxState
    control: dict[str, str]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    control = with_admin_token({FAULT_INJECTION_VAR: "1"}, tmp_path)
    with running_sandbox(ControlAccess.from_environ(control)) as (address, state):
        yield address, state, admin_authorization(control)


async def _adapter(services: ServicesUnderTest, sandbox: Sandbox, **environ: str) -> Adapter:
    env = {"PARTNER_SANDBOX_ADDR": sandbox[0], **environ}
    stub = await services.serve(
        "channel-adapter", build, pb_grpc.ChannelAdapterServiceStub, environ=env
    )
    return Adapter(stub, *sandbox)


@pytest.fixture
async def adapter(services: ServicesUnderTest, sandbox: Sandbox) -> Adapter:
    return await _adapter(services, sandbox)


def _post(
    address: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Any:
    request = urllib.request.Request(
        f"http://{address}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


async def _fault(adapter: Adapter, partner: str) -> None:
    await asyncio.to_thread(
        _post,
        adapter.sandbox,
        "/_control/faults",
        {"partner": partner, "error_rate": 1.0},
        adapter.control,
    )


def _clear_faults(adapter: Adapter) -> None:
    with adapter.state.lock:
        adapter.state.faults.clear()


def _charge(
    request_id: str = "r1",
    payment_id: str = "pay_1",
    amount: int = 1250,
    currency: str = "EUR",
    settle_in: str = "",
    token: str = "tok_visa",
) -> pb.ChargeRequest:
    return pb.ChargeRequest(
        request_id=request_id,
        payment_id=payment_id,
        merchant_id="m_1",
        amount=common_pb2.Money(amount_minor=amount, currency_code=currency),
        settlement_currency_code=settle_in,
        payment_method_token=token,
    )


def _money(amount: int, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(amount_minor=amount, currency_code=currency)


def _reason(error: aio.AioRpcError) -> tuple[str, dict[str, str]]:
    info = error_info_of(error)
    assert info is not None
    return info.reason, dict(info.metadata)


async def test_charge_is_captured_at_the_channel(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge())).charge
    assert charge.status == pb.CHARGE_STATUS_SUCCEEDED
    assert charge.channel_reference in adapter.state.charges
    assert charge.settlement_amount == _money(1250)


async def test_replayed_charge_returns_the_first_and_charges_once(adapter: Adapter) -> None:
    first = await adapter.stub.Charge(_charge())
    again = await adapter.stub.Charge(_charge())
    assert again == first
    assert len(adapter.state.charges) == 1


async def test_concurrent_duplicates_charge_once(adapter: Adapter, engine: str) -> None:
    results = await asyncio.gather(
        *(adapter.stub.Charge(_charge()) for _ in range(10)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, aio.AioRpcError):
            assert result.code() == grpc.StatusCode.ABORTED
    assert len(adapter.state.charges) == 1


async def test_request_id_reused_with_another_body_is_invalid_argument(
    adapter: Adapter,
) -> None:
    await adapter.stub.Charge(_charge())
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.Charge(_charge(amount=999))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_decline_is_a_declined_charge_not_an_error(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge(token="tok_decline_insufficient"))).charge
    assert charge.status == pb.CHARGE_STATUS_DECLINED
    assert charge.decline_reason == "card_declined"


async def test_charge_converts_to_the_settlement_currency_half_even(adapter: Adapter) -> None:
    charge = (
        await adapter.stub.Charge(_charge(amount=1234, currency="JPY", settle_in="USD"))
    ).charge
    rate = Decimal(charge.exchange_rate)
    expected = (Decimal(1234) * rate * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    assert charge.amount == _money(1234, "JPY")
    assert charge.settlement_amount == _money(int(expected), "USD")


async def test_exchange_rate_is_served_from_cache_within_ttl(adapter: Adapter) -> None:
    request = pb.GetExchangeRateRequest(source_currency_code="USD", target_currency_code="EUR")
    first = (await adapter.stub.GetExchangeRate(request)).exchange_rate
    second = (await adapter.stub.GetExchangeRate(request)).exchange_rate
    assert (first.from_cache, second.from_cache) == (False, True)
    assert Decimal(second.rate) == Decimal("0.92")
    assert adapter.state.requests["exchange-rate"] == 1


async def test_zero_ttl_fetches_the_rate_every_time(
    services: ServicesUnderTest, sandbox: Sandbox
) -> None:
    running = await _adapter(services, sandbox, CHANNEL_ADAPTER_RATE_TTL_S="0")
    request = pb.GetExchangeRateRequest(source_currency_code="GBP", target_currency_code="EUR")
    await running.stub.GetExchangeRate(request)
    again = (await running.stub.GetExchangeRate(request)).exchange_rate
    assert not again.from_cache
    assert running.state.requests["exchange-rate"] == 2


async def test_partial_then_full_refund_refunds_the_charge(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge())).charge
    part = await adapter.stub.RefundCharge(
        pb.RefundChargeRequest(request_id="f1", charge_id=charge.charge_id, amount=_money(250))
    )
    assert part.charge.status == pb.CHARGE_STATUS_PARTIALLY_REFUNDED
    rest = await adapter.stub.RefundCharge(
        pb.RefundChargeRequest(request_id="f2", charge_id=charge.charge_id, amount=_money(1000))
    )
    assert rest.charge.status == pb.CHARGE_STATUS_REFUNDED
    assert rest.charge.refunded_amount == _money(1250)
    got = await adapter.stub.GetCharge(pb.GetChargeRequest(charge_id=charge.charge_id))
    assert [r.amount.amount_minor for r in got.refunds] == [250, 1000]


async def test_refund_above_captured_is_failed_precondition(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge())).charge
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.RefundCharge(
            pb.RefundChargeRequest(request_id="f1", charge_id=charge.charge_id, amount=_money(1251))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(caught.value)[0] == "REFUND_EXCEEDS_CAPTURED"
    assert not adapter.state.refunds


async def test_replayed_refund_refunds_once(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge())).charge
    request = pb.RefundChargeRequest(
        request_id="f1", charge_id=charge.charge_id, amount=_money(100)
    )
    first = await adapter.stub.RefundCharge(request)
    again = await adapter.stub.RefundCharge(request)
    assert again == first
    assert adapter.state.charges[charge.channel_reference]["refunded_minor"] == 100


async def test_declined_charge_cannot_be_refunded(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge(token="tok_decline"))).charge
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.RefundCharge(
            pb.RefundChargeRequest(request_id="f1", charge_id=charge.charge_id, amount=_money(1))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_void_cancels_a_captured_charge_once(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge())).charge
    request = pb.VoidChargeRequest(request_id="v1", charge_id=charge.charge_id)
    voided = (await adapter.stub.VoidCharge(request)).charge
    assert voided.status == pb.CHARGE_STATUS_VOIDED
    assert adapter.state.charges[charge.channel_reference]["status"] == "voided"
    assert (await adapter.stub.VoidCharge(request)).charge == voided


async def test_void_leaves_a_declined_charge_unchanged(adapter: Adapter) -> None:
    charge = (await adapter.stub.Charge(_charge(token="tok_decline"))).charge
    voided = await adapter.stub.VoidCharge(
        pb.VoidChargeRequest(request_id="v1", charge_id=charge.charge_id)
    )
    assert voided.charge.status == pb.CHARGE_STATUS_DECLINED


async def test_list_charges_learns_a_charge_only_the_channel_knows(adapter: Adapter) -> None:
    # The adapter's own write was lost: the channel has a charge the store never recorded.
    made = await asyncio.to_thread(
        _post,
        adapter.sandbox,
        "/payment-channel/charges",
        {"amount_minor": 500, "currency": "EUR", "card_token": "tok", "reference": "pay_9"},
    )
    listed = await adapter.stub.ListCharges(pb.ListChargesRequest(payment_id="pay_9"))
    assert [(c.channel_reference, c.status) for c in listed.charges] == [
        (made["id"], pb.CHARGE_STATUS_SUCCEEDED)
    ]
    voided = await adapter.stub.VoidCharge(
        pb.VoidChargeRequest(request_id="v1", charge_id=listed.charges[0].charge_id)
    )
    assert voided.charge.status == pb.CHARGE_STATUS_VOIDED
    assert adapter.state.charges[made["id"]]["status"] == "voided"


async def test_list_charges_pages_a_payments_charges(adapter: Adapter) -> None:
    for index in range(5):
        await adapter.stub.Charge(_charge(request_id=f"r{index}"))
    seen: list[str] = []
    token = ""
    while True:
        page = await adapter.stub.ListCharges(
            pb.ListChargesRequest(payment_id="pay_1", page_size=2, page_token=token)
        )
        seen.extend(c.request_id for c in page.charges)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"r{i}" for i in range(5)]


async def test_channel_outage_is_unavailable_naming_the_partner(adapter: Adapter) -> None:
    await _fault(adapter, "payment-channel")
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.Charge(_charge())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reason, metadata = _reason(caught.value)
    assert (reason, metadata["partner"]) == ("DOWNSTREAM_UNAVAILABLE", "payment-channel")


async def test_retry_after_outage_charges_once(adapter: Adapter) -> None:
    await _fault(adapter, "payment-channel")
    with pytest.raises(aio.AioRpcError):
        await adapter.stub.Charge(_charge())
    _clear_faults(adapter)
    charge = (await adapter.stub.Charge(_charge())).charge
    assert charge.status == pb.CHARGE_STATUS_SUCCEEDED
    assert len(adapter.state.charges) == 1


async def test_void_of_a_charge_the_channel_never_received_closes_it(adapter: Adapter) -> None:
    await _fault(adapter, "payment-channel")
    with pytest.raises(aio.AioRpcError):
        await adapter.stub.Charge(_charge())
    _clear_faults(adapter)
    pending = (await adapter.stub.ListCharges(pb.ListChargesRequest(payment_id="pay_1"))).charges
    voided = await adapter.stub.VoidCharge(
        pb.VoidChargeRequest(request_id="v1", charge_id=pending[0].charge_id)
    )
    assert voided.charge.status == pb.CHARGE_STATUS_VOIDED
    # A late retry of the charge replays the void instead of charging.
    again = await adapter.stub.Charge(_charge())
    assert again.charge.status == pb.CHARGE_STATUS_VOIDED
    assert not adapter.state.charges


async def test_rate_outage_is_unavailable_and_writes_nothing(adapter: Adapter) -> None:
    await _fault(adapter, "exchange-rate")
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.Charge(_charge(settle_in="USD"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reason, metadata = _reason(caught.value)
    assert (reason, metadata["partner"]) == ("EXCHANGE_RATE_UNAVAILABLE", "exchange-rate")
    _clear_faults(adapter)
    charge = (await adapter.stub.Charge(_charge(settle_in="USD"))).charge
    assert charge.status == pb.CHARGE_STATUS_SUCCEEDED


@pytest.mark.parametrize(
    "request_",
    [
        _charge(currency="XXX"),
        _charge(amount=0),
        _charge(token=""),
        _charge(settle_in="ZZZ"),
        _charge(request_id=""),
        _charge(payment_id="bad id!"),
    ],
)
async def test_bad_charge_request_is_invalid_argument(
    adapter: Adapter, request_: pb.ChargeRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.Charge(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not adapter.state.charges


async def test_unknown_charge_is_not_found(adapter: Adapter) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await adapter.stub.GetCharge(pb.GetChargeRequest(charge_id="ch_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
