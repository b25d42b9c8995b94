"""merchant-service RPCs: validate, then read or write the store; the dashboard fans out.

The webhook signing secret lives at notification-service, which alone signs webhooks;
RotateWebhookSecret here is the merchant's door to it, for the merchant's own id only.
A merchant calling GetMerchant or GetMerchantDashboard with its API key likewise sees only
itself: an empty merchant_id means its own, any other id is NOT_FOUND (``merchant_scope``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from services.merchant import profile
from services.merchant.dashboard import DashboardSources, assemble
from services.merchant.store import MerchantStore
from services.mesh import validation as v
from services.mesh.authz import merchant_scope
from services.mesh.bootstrap import Context

_SETTABLE_STATUSES = (merchant_pb2.MERCHANT_STATUS_ACTIVE, merchant_pb2.MERCHANT_STATUS_SUSPENDED)


class MerchantServicer(merchant_pb2_grpc.MerchantServiceServicer):
    """Creates, reads, lists and (de)activates merchants and builds their dashboard."""

    def __init__(
        self,
        store: MerchantStore,
        sources: DashboardSources,
        *,
        webhook_secrets: notification_pb2_grpc.NotificationServiceAsyncStub,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._store = store
        self._sources = sources
        self._webhook_secrets = webhook_secrets
        self._clock_ns = clock_ns

    async def CreateMerchant(
        self, request: merchant_pb2.CreateMerchantRequest, context: Context
    ) -> merchant_pb2.CreateMerchantResponse:
        v.require_request_id("request_id", request.request_id)
        profile.require_name("name", request.name)
        profile.require_email("email", request.email)
        profile.require_country("country_code", request.country_code)
        v.require_currency("default_currency_code", request.default_currency_code)
        profile.optional_webhook_url("webhook_url", request.webhook_url)
        return merchant_pb2.CreateMerchantResponse(merchant=self._store.create(request))

    async def GetMerchant(
        self, request: merchant_pb2.GetMerchantRequest, context: Context
    ) -> merchant_pb2.GetMerchantResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        return merchant_pb2.GetMerchantResponse(merchant=self._store.get(merchant_id))

    async def ListMerchants(
        self, request: merchant_pb2.ListMerchantsRequest, context: Context
    ) -> merchant_pb2.ListMerchantsResponse:
        if request.status not in merchant_pb2.MerchantStatus.values():
            raise v.invalid("status", f"{request.status} is not a MerchantStatus")
        size = v.page_size(request.page_size)
        filters = {"status": request.status}
        before = v.page_position(request.page_token, filters, v.NANOS_AND_ID)
        merchants, next_token = v.page_of(
            self._store.list(status=request.status, before=before, limit=size + 1),
            size,
            filters,
            lambda last: {"t": last.create_time.ToNanoseconds(), "id": last.merchant_id},
        )
        return merchant_pb2.ListMerchantsResponse(merchants=merchants, next_page_token=next_token)

    async def UpdateMerchantStatus(
        self, request: merchant_pb2.UpdateMerchantStatusRequest, context: Context
    ) -> merchant_pb2.UpdateMerchantStatusResponse:
        v.require_request_id("request_id", request.request_id)
        v.require_id("merchant_id", request.merchant_id)
        if request.status not in _SETTABLE_STATUSES:
            raise v.invalid("status", "must be MERCHANT_STATUS_ACTIVE or MERCHANT_STATUS_SUSPENDED")
        v.optional_text("reason", request.reason)
        return merchant_pb2.UpdateMerchantStatusResponse(
            merchant=self._store.update_status(request)
        )

    async def GetMerchantDashboard(
        self, request: merchant_pb2.GetMerchantDashboardRequest, context: Context
    ) -> merchant_pb2.GetMerchantDashboardResponse:
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        # Our own store first: an unknown merchant is NOT_FOUND, and no downstream is asked.
        # The sections are then read as merchant-service, a mesh caller, for this merchant only.
        merchant = self._store.get(merchant_id)
        now = Timestamp()
        now.FromNanoseconds(self._clock_ns())
        return await assemble(self._sources, merchant, generate_time=now)

    async def RotateWebhookSecret(
        self, request: merchant_pb2.RotateWebhookSecretRequest, context: Context
    ) -> merchant_pb2.RotateWebhookSecretResponse:
        v.require_request_id("request_id", request.request_id)
        merchant_id = v.require_id("merchant_id", merchant_scope(request.merchant_id))
        # Our own store first: an unknown merchant is NOT_FOUND and gets no secret.
        self._store.get(merchant_id)
        rotated = await self._webhook_secrets.RotateWebhookSecret(
            notification_pb2.RotateWebhookSecretRequest(
                request_id=request.request_id,
                merchant_id=merchant_id,
                previous_secret_overlap=request.previous_secret_overlap,
            )
        )
        response = merchant_pb2.RotateWebhookSecretResponse(
            webhook_secret=rotated.webhook_secret, secret=rotated.secret
        )
        if rotated.HasField("previous_secret_expire_time"):
            response.previous_secret_expire_time.CopyFrom(rotated.previous_secret_expire_time)
        return response
