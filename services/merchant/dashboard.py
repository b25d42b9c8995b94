"""The merchant dashboard: five downstream reads run concurrently, each filling one section.

A downstream that fails (down, out of deadline, breaker open) empties only its own section,
which is marked UNAVAILABLE with the reason and message; the dashboard as a whole still
answers. Anything that is not a failed call is a bug here and fails the RPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from interceptors.errors import CIRCUIT_OPEN_REASON, CallError, DeadlineExceededError, Reason
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2, payment_gateway_pb2_grpc
from paymesh.risk.v1 import risk_pb2, risk_pb2_grpc
from services.mesh.topology import Target

#: How many notifications the dashboard shows.
RECENT_NOTIFICATIONS = 10
#: Balances fetched in one page; a merchant has a handful of ledger accounts.
BALANCES_PAGE_SIZE = 100

ResponseT = TypeVar("ResponseT")


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardSources:
    """The five downstream stubs the dashboard reads, made by the client factory."""

    payments: payment_gateway_pb2_grpc.PaymentGatewayServiceAsyncStub
    """payment-gateway: the payment summary."""
    accounting: accounting_pb2_grpc.AccountingServiceAsyncStub
    """accounting-service: ledger balances."""
    analytics: analytics_pb2_grpc.AnalyticsServiceAsyncStub
    """analytics-service: merchant statistics."""
    risk: risk_pb2_grpc.RiskServiceAsyncStub
    """risk-service: the risk summary."""
    notifications: notification_pb2_grpc.NotificationServiceAsyncStub
    """notification-service: recent webhook notifications."""


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[ResponseT]):
    """A downstream read's answer, or the section header saying why there is none."""

    section: merchant_pb2.DashboardSection
    response: ResponseT | None


def _reason_of(error: CallError) -> str:
    """The ErrorReason name a failed call carries, else one derived from its code."""
    if error.stop_reason == "breaker_open":
        return CIRCUIT_OPEN_REASON
    if error.reason:
        return error.reason
    if isinstance(error, DeadlineExceededError):
        return Reason.DEADLINE_EXHAUSTED
    return Reason.DOWNSTREAM_UNAVAILABLE


def unavailable_section(source: str, error: CallError) -> merchant_pb2.DashboardSection:
    """The header of a section whose downstream call failed with ``error``."""
    return merchant_pb2.DashboardSection(
        availability=merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE,
        source_service=source,
        reason=_reason_of(error),
        message=f"{source} failed with {error.code().name}: {error.details() or 'no details'}",
    )


async def _read(source: str, call: Callable[[], Awaitable[ResponseT]]) -> _Outcome[ResponseT]:
    """Make and await one downstream read; a failed call becomes an UNAVAILABLE section.

    The call is made inside the ``try`` because the policy chain may refuse it on the spot
    (open breaker). Every failed call degrades its section, not only UNAVAILABLE and
    DEADLINE_EXCEEDED: a downstream's INTERNAL or UNIMPLEMENTED is just as much "this part
    cannot be shown now", and failing the whole dashboard for one part is what we avoid.
    """
    try:
        response = await call()
    except CallError as error:
        return _Outcome(unavailable_section(source, error), None)
    available = merchant_pb2.DashboardSection(
        availability=merchant_pb2.SECTION_AVAILABILITY_AVAILABLE, source_service=source
    )
    return _Outcome(available, response)


async def assemble(
    sources: DashboardSources, merchant: merchant_pb2.Merchant, *, generate_time: Timestamp
) -> merchant_pb2.GetMerchantDashboardResponse:
    """The dashboard of ``merchant``, its five sections read concurrently.

    The policy chain behind each stub gives every read its deadline (bounded by what is left
    of the incoming call's), so one slow downstream costs at most that deadline, in parallel
    with the others, never their sum.
    """
    merchant_id = merchant.merchant_id
    async with asyncio.TaskGroup() as group:
        payments = group.create_task(
            _read(
                Target.PAYMENT_GATEWAY,
                lambda: sources.payments.GetPaymentSummary(
                    payment_gateway_pb2.GetPaymentSummaryRequest(merchant_id=merchant_id)
                ),
            )
        )
        balances = group.create_task(
            _read(
                Target.ACCOUNTING,
                lambda: sources.accounting.ListBalances(
                    accounting_pb2.ListBalancesRequest(
                        merchant_id=merchant_id, page_size=BALANCES_PAGE_SIZE
                    )
                ),
            )
        )
        stats = group.create_task(
            _read(
                Target.ANALYTICS,
                lambda: sources.analytics.GetMerchantStats(
                    analytics_pb2.GetMerchantStatsRequest(merchant_id=merchant_id)
                ),
            )
        )
        risk = group.create_task(
            _read(
                Target.RISK,
                lambda: sources.risk.GetRiskSummary(
                    risk_pb2.GetRiskSummaryRequest(merchant_id=merchant_id)
                ),
            )
        )
        notifications = group.create_task(
            _read(
                Target.NOTIFICATION,
                lambda: sources.notifications.ListNotifications(
                    notification_pb2.ListNotificationsRequest(
                        merchant_id=merchant_id, page_size=RECENT_NOTIFICATIONS
                    )
                ),
            )
        )

    dashboard = merchant_pb2.GetMerchantDashboardResponse(
        merchant=merchant, generate_time=generate_time
    )
    payments_read = payments.result()
    dashboard.payments.section.CopyFrom(payments_read.section)
    if payments_read.response is not None:
        dashboard.payments.summary.CopyFrom(payments_read.response.summary)
    balances_read = balances.result()
    dashboard.balances.section.CopyFrom(balances_read.section)
    if balances_read.response is not None:
        dashboard.balances.balances.extend(balances_read.response.balances)
    stats_read = stats.result()
    dashboard.stats.section.CopyFrom(stats_read.section)
    if stats_read.response is not None:
        dashboard.stats.stats.CopyFrom(stats_read.response.stats)
    risk_read = risk.result()
    dashboard.risk.section.CopyFrom(risk_read.section)
    if risk_read.response is not None:
        dashboard.risk.summary.CopyFrom(risk_read.response.summary)
    notifications_read = notifications.result()
    dashboard.notifications.section.CopyFrom(notifications_read.section)
    if notifications_read.response is not None:
        dashboard.notifications.recent_notifications.extend(
            notifications_read.response.notifications
        )
    return dashboard
