"""analytics-service through real gRPC on loopback: events counted once, exact stats, paging."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeAlias

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.common.v1 import common_pb2
from services.analytics.__main__ import build
from tests.servers import ServicesUnderTest, error_reason

SUCCEEDED = analytics_pb2.EVENT_TYPE_PAYMENT_SUCCEEDED
DECLINED = analytics_pb2.EVENT_TYPE_PAYMENT_DECLINED
FAILED = analytics_pb2.EVENT_TYPE_PAYMENT_FAILED
REFUNDED = analytics_pb2.EVENT_TYPE_PAYMENT_REFUNDED
VOIDED = analytics_pb2.EVENT_TYPE_PAYMENT_VOIDED

Analytics: TypeAlias = "analytics_pb2_grpc.AnalyticsServiceAsyncStub"  # a typing-only class


@pytest.fixture
async def analytics(services: ServicesUnderTest) -> Analytics:
    return await services.serve("analytics-service", build, analytics_pb2_grpc.AnalyticsServiceStub)


def _at(seconds: int) -> Timestamp:
    return Timestamp(seconds=1_700_000_000 + seconds)


def _event(
    event_id: str,
    event_type: analytics_pb2.EventType.ValueType = SUCCEEDED,
    *,
    merchant_id: str = "m_1",
    amount: int = 1000,
    currency: str = "EUR",
    at: int | None = None,
) -> analytics_pb2.RecordEventRequest:
    request = analytics_pb2.RecordEventRequest(
        request_id=event_id,
        merchant_id=merchant_id,
        event_type=event_type,
        payment_id=f"pay_{event_id}",
        amount=common_pb2.Money(amount_minor=amount, currency_code=currency),
    )
    if at is not None:
        request.occur_time.CopyFrom(_at(at))
    return request


async def _stats(analytics: Analytics, merchant_id: str = "m_1") -> analytics_pb2.MerchantStats:
    response = await analytics.GetMerchantStats(
        analytics_pb2.GetMerchantStatsRequest(merchant_id=merchant_id)
    )
    return response.stats


async def _rejected(call: Awaitable[object]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_recorded_event_carries_its_request_id_and_times(analytics: Analytics) -> None:
    response = await analytics.RecordEvent(_event("ev_1"))
    event = response.event
    assert event.event_id == "ev_1"
    assert event.payment_id == "pay_ev_1"
    assert event.HasField("occur_time")
    assert event.occur_time == event.create_time


async def test_given_occur_time_is_kept(analytics: Analytics) -> None:
    response = await analytics.RecordEvent(_event("ev_1", at=5))
    assert response.event.occur_time == _at(5)


async def test_replayed_event_is_counted_once(analytics: Analytics) -> None:
    first = await analytics.RecordEvent(_event("ev_1"))
    again = await analytics.RecordEvent(_event("ev_1"))
    assert again.event == first.event
    stats = await _stats(analytics)
    assert (stats.event_count, stats.succeeded_count) == (1, 1)
    assert stats.volumes[0].succeeded_volume.amount_minor == 1000


async def test_concurrent_duplicates_are_counted_once(analytics: Analytics, engine: str) -> None:
    request = _event("ev_1")
    results = await asyncio.gather(
        *(analytics.RecordEvent(request) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, analytics_pb2.RecordEventResponse) for r in results)
    assert (await _stats(analytics)).event_count == 1


async def test_event_id_reused_with_another_body_is_invalid_argument(
    analytics: Analytics,
) -> None:
    await analytics.RecordEvent(_event("ev_1"))
    error = await _rejected(analytics.RecordEvent(_event("ev_1", amount=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "IDEMPOTENCY_KEY_REUSED"
    assert (await _stats(analytics)).event_count == 1


async def test_stats_count_each_type_and_compute_success_rate(analytics: Analytics) -> None:
    for index, kind in enumerate([SUCCEEDED, SUCCEEDED, DECLINED, FAILED, REFUNDED, VOIDED]):
        await analytics.RecordEvent(_event(f"ev_{index}", kind))
    stats = await _stats(analytics)
    assert stats.merchant_id == "m_1"
    assert stats.event_count == 6
    assert (stats.succeeded_count, stats.declined_count, stats.failed_count) == (2, 1, 1)
    assert stats.refunded_count == 1
    assert stats.success_rate_bps == 5_000


async def test_success_rate_rounds_down_in_basis_points(analytics: Analytics) -> None:
    for index, kind in enumerate([SUCCEEDED, SUCCEEDED, DECLINED]):
        await analytics.RecordEvent(_event(f"ev_{index}", kind))
    assert (await _stats(analytics)).success_rate_bps == 6_666


async def test_volumes_are_exact_per_currency(analytics: Analytics) -> None:
    await analytics.RecordEvent(_event("e1", SUCCEEDED, amount=1050, currency="EUR"))
    await analytics.RecordEvent(_event("e2", SUCCEEDED, amount=2075, currency="EUR"))
    await analytics.RecordEvent(_event("e3", REFUNDED, amount=500, currency="EUR"))
    await analytics.RecordEvent(_event("e4", SUCCEEDED, amount=300, currency="JPY"))
    await analytics.RecordEvent(_event("e5", DECLINED, amount=999, currency="USD"))
    stats = await _stats(analytics)
    volumes = {
        v.currency_code: (v.succeeded_volume.amount_minor, v.refunded_volume.amount_minor)
        for v in stats.volumes
    }
    assert volumes == {"EUR": (3125, 500), "JPY": (300, 0)}
    assert [v.currency_code for v in stats.volumes] == ["EUR", "JPY"]


async def test_merchant_without_events_has_empty_stats(analytics: Analytics) -> None:
    await analytics.RecordEvent(_event("ev_1", merchant_id="m_2"))
    stats = await _stats(analytics)
    assert stats.event_count == 0
    assert stats.success_rate_bps == 0
    assert not stats.volumes
    assert not stats.HasField("first_event_time")


async def test_stats_report_first_and_last_event_times(analytics: Analytics) -> None:
    for index, at in enumerate([30, 10, 20]):
        await analytics.RecordEvent(_event(f"ev_{index}", at=at))
    stats = await _stats(analytics)
    assert (stats.first_event_time, stats.last_event_time) == (_at(10), _at(30))


async def test_start_time_counts_only_later_events(analytics: Analytics) -> None:
    await analytics.RecordEvent(_event("old", DECLINED, at=0))
    await analytics.RecordEvent(_event("new", SUCCEEDED, at=100))
    response = await analytics.GetMerchantStats(
        analytics_pb2.GetMerchantStatsRequest(merchant_id="m_1", start_time=_at(100))
    )
    assert response.stats.event_count == 1
    assert response.stats.success_rate_bps == 10_000


async def test_events_are_listed_newest_first(analytics: Analytics) -> None:
    for index, at in enumerate([10, 30, 20]):
        await analytics.RecordEvent(_event(f"ev_{index}", at=at))
    page = await analytics.ListEvents(analytics_pb2.ListEventsRequest(merchant_id="m_1"))
    assert [e.event_id for e in page.events] == ["ev_1", "ev_2", "ev_0"]
    assert not page.next_page_token


async def test_event_pages_cover_every_event_once(analytics: Analytics) -> None:
    # Several events share a time so the cursor must break ties by event id.
    for index in range(8):
        await analytics.RecordEvent(_event(f"ev_{index}", at=index // 3))
    seen: list[str] = []
    token = ""
    while True:
        page = await analytics.ListEvents(
            analytics_pb2.ListEventsRequest(merchant_id="m_1", page_size=3, page_token=token)
        )
        seen.extend(e.event_id for e in page.events)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"ev_{i}" for i in range(8)]
    assert len(seen) == 8


async def test_events_filter_by_type_and_merchant(analytics: Analytics) -> None:
    await analytics.RecordEvent(_event("a", SUCCEEDED))
    await analytics.RecordEvent(_event("b", DECLINED))
    await analytics.RecordEvent(_event("c", DECLINED, merchant_id="m_2"))
    page = await analytics.ListEvents(
        analytics_pb2.ListEventsRequest(merchant_id="m_1", event_type=DECLINED)
    )
    assert [e.event_id for e in page.events] == ["b"]


async def test_page_token_of_another_filter_is_rejected(analytics: Analytics) -> None:
    for index in range(3):
        await analytics.RecordEvent(_event(f"ev_{index}"))
    page = await analytics.ListEvents(
        analytics_pb2.ListEventsRequest(merchant_id="m_1", page_size=1)
    )
    error = await _rejected(
        analytics.ListEvents(
            analytics_pb2.ListEventsRequest(
                merchant_id="m_1", event_type=SUCCEEDED, page_token=page.next_page_token
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "PAGE_TOKEN_INVALID"


def _without_merchant() -> analytics_pb2.RecordEventRequest:
    request = _event("e")
    request.merchant_id = ""
    return request


def _bad_occur_time() -> analytics_pb2.RecordEventRequest:
    request = _event("e")
    request.occur_time.nanos = -1
    return request


@pytest.mark.parametrize(
    "request_",
    [
        _without_merchant(),
        _event("e", analytics_pb2.EVENT_TYPE_UNSPECIFIED),
        _event("e", amount=0),
        _event("e", currency="XXX"),
        _event("bad id!"),
        _bad_occur_time(),
    ],
    ids=["no-merchant", "no-type", "zero-amount", "bad-currency", "bad-request-id", "bad-time"],
)
async def test_bad_event_is_invalid_argument(
    analytics: Analytics, request_: analytics_pb2.RecordEventRequest
) -> None:
    error = await _rejected(analytics.RecordEvent(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _stats(analytics)).event_count == 0


async def test_stats_without_merchant_is_invalid_argument(analytics: Analytics) -> None:
    error = await _rejected(analytics.GetMerchantStats(analytics_pb2.GetMerchantStatsRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
