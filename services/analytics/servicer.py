"""analytics-service RPCs: validate, then record events or compute statistics from the store."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics.store import EventStore
from services.mesh import batch
from services.mesh import validation as v
from services.mesh.batch import ItemOutcome
from services.mesh.bootstrap import Context
from services.mesh.topology import Target

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
#: ErrorInfo domain of a batch item's status, as of a failed call.
DOMAIN = Target.ANALYTICS


def _require_timestamp(field: str, stamp: Timestamp) -> int:
    """The timestamp in nanoseconds, if it is a valid google.protobuf.Timestamp."""
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 10**9:
        raise v.invalid(field, "is not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)")
    return stamp.ToNanoseconds()


def _require_event_type(field: str, value: int, *, allow_unspecified: bool) -> int:
    if value not in analytics_pb2.EventType.values() or (
        value == analytics_pb2.EVENT_TYPE_UNSPECIFIED and not allow_unspecified
    ):
        raise v.invalid(field, f"{value} is not a concrete EventType")
    return value


def _check_event(request: analytics_pb2.RecordEventRequest) -> None:
    v.require_request_id("request_id", request.request_id)
    v.require_id("merchant_id", request.merchant_id)
    _require_event_type("event_type", request.event_type, allow_unspecified=False)
    v.require_id("payment_id", request.payment_id)
    v.require_amount("amount", request.amount)
    if request.HasField("occur_time"):
        _require_timestamp("occur_time", request.occur_time)


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    """Records payment events once each; reports merchant statistics and event lists."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def RecordEvent(
        self, request: analytics_pb2.RecordEventRequest, context: Context
    ) -> analytics_pb2.RecordEventResponse:
        return self._record([request])[0].unwrap()

    async def RecordEvents(
        self, request: analytics_pb2.RecordEventsRequest, context: Context
    ) -> analytics_pb2.RecordEventsResponse:
        batch.require_items("events", request.events)
        outcomes = self._record(request.events)
        return analytics_pb2.RecordEventsResponse(
            results=batch.results(analytics_pb2.RecordEventResult, outcomes, domain=DOMAIN)
        )

    def _record(
        self, requests: Sequence[analytics_pb2.RecordEventRequest]
    ) -> list[ItemOutcome[analytics_pb2.RecordEventResponse]]:
        return batch.apply_each(requests, _check_event, self._store.record_each)

    async def GetMerchantStats(
        self, request: analytics_pb2.GetMerchantStatsRequest, context: Context
    ) -> analytics_pb2.GetMerchantStatsResponse:
        v.require_id("merchant_id", request.merchant_id)
        since_ns = (
            _require_timestamp("start_time", request.start_time)
            if request.HasField("start_time")
            else None
        )
        return analytics_pb2.GetMerchantStatsResponse(
            stats=self._store.stats(request.merchant_id, since_ns=since_ns)
        )

    async def ListEvents(
        self, request: analytics_pb2.ListEventsRequest, context: Context
    ) -> analytics_pb2.ListEventsResponse:
        v.require_id("merchant_id", request.merchant_id)
        _require_event_type("event_type", request.event_type, allow_unspecified=True)
        size = v.page_size(request.page_size)
        filters = {"merchant_id": request.merchant_id, "event_type": request.event_type}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        events, next_token = v.page_of(
            self._store.list(
                merchant_id=request.merchant_id,
                event_type=request.event_type,
                before=before,
                limit=size + 1,
            ),
            size,
            filters,
            lambda last: {"t": last.occur_time.ToNanoseconds(), "id": last.event_id},
        )
        return analytics_pb2.ListEventsResponse(events=events, next_page_token=next_token)
