"""merchant-service through real gRPC on loopback: profiles, status changes, the dashboard.

The dashboard's downstreams are real services (their own ``build``) where they exist; an
outage is a downstream address where nothing listens, or a real downstream stopped. The
operator calls the mTLS mesh port; a merchant calls the public port with its API key and
sees only itself.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from interceptors.errors import (
    STATUS_DETAILS_KEY,
    CallError,
    Reason,
    circuit_open_error,
    from_grpc_error,
    rich_status,
)
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from services.accounting.__main__ import build as build_accounting
from services.analytics.__main__ import build as build_analytics
from services.merchant.__main__ import build
from services.merchant.dashboard import unavailable_section
from services.mesh.bootstrap import Builder
from services.mesh.topology import Topology, env_prefix
from services.notification.__main__ import build as build_notification
from services.payment_gateway.__main__ import build as build_gateway
from services.risk.__main__ import build as build_risk
from tests.integration.tenants import (
    Directory,
    merchant_directory,
    merchant_stub,
    refusal,
)
from tests.servers import (
    ServicesUnderTest,
    error_reason,
    granted_stub,
    public_channel,
    rich_status_of,
    running_service,
)

DOWNSTREAMS = (
    "payment-gateway",
    "accounting-service",
    "analytics-service",
    "risk-service",
    "notification-service",
)


def _silent_address() -> str:
    """A loopback address where nothing listens (a port the OS just handed out and freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _environ(tmp_path: Path, **addresses: str) -> dict[str, str]:
    """merchant-service's environ: every downstream (and merchant-auth, which checks the
    keys of merchant calls) silent unless ``addresses`` names it."""
    environ = {"PAYMESH_VAR_DIR": str(tmp_path)}
    for name in (*DOWNSTREAMS, "merchant-auth-service"):
        environ[f"{env_prefix(name)}_ADDR"] = addresses.get(name) or _silent_address()
    return environ


def _operator(address: str) -> contextlib.AbstractAsyncContextManager[Any]:
    """merchant-service's mesh port, each method called by an identity granted it."""
    return granted_stub(address, merchant_pb2_grpc.MerchantServiceStub, "merchant-service")


@pytest.fixture
async def merchants(
    tmp_path: Path, services: ServicesUnderTest
) -> merchant_pb2_grpc.MerchantServiceAsyncStub:
    return await services.serve(
        "merchant-service", build, merchant_pb2_grpc.MerchantServiceStub, environ=_environ(tmp_path)
    )


def _create(request_id: str = "r1", **fields: str) -> merchant_pb2.CreateMerchantRequest:
    profile = {
        "name": "Kaffeehaus Zentral",
        "email": "billing@kaffeehaus.example",
        "country_code": "AT",
        "default_currency_code": "EUR",
        "webhook_url": "https://kaffeehaus.example/hooks/paymesh",
    }
    profile.update(fields)
    return merchant_pb2.CreateMerchantRequest(request_id=request_id, **profile)


def _details(error: aio.AioRpcError) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest field names of a failed call."""
    fields: list[str] = []
    for detail in rich_status_of(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return error_reason(error), fields


async def test_created_merchant_is_active_with_a_server_generated_id(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant
    assert created.merchant_id.startswith("m_")
    assert created.status == merchant_pb2.MERCHANT_STATUS_ACTIVE
    fetched = await merchants.GetMerchant(
        merchant_pb2.GetMerchantRequest(merchant_id=created.merchant_id)
    )
    assert fetched.merchant == created


async def test_replayed_create_returns_the_first_merchant(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    first = await merchants.CreateMerchant(_create("r1"))
    again = await merchants.CreateMerchant(_create("r1"))
    assert again.merchant == first.merchant
    listed = await merchants.ListMerchants(merchant_pb2.ListMerchantsRequest())
    assert [m.merchant_id for m in listed.merchants] == [first.merchant.merchant_id]


async def test_request_id_reused_with_another_body_is_invalid_argument(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    await merchants.CreateMerchant(_create("r1"))
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.CreateMerchant(_create("r1", name="Another Shop"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[0] == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "   "),
        ("name", "x" * 201),
        ("email", "not-an-email"),
        ("email", "a@b"),
        ("country_code", "XX"),
        ("country_code", "at"),
        ("default_currency_code", "XXX"),
        ("webhook_url", "ftp://kaffeehaus.example/hooks"),
        ("webhook_url", "http://kaffeehaus.example/hooks"),
        ("webhook_url", "https://"),
    ],
)
async def test_bad_profile_field_is_invalid_argument_naming_the_field(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub, field: str, value: str
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.CreateMerchant(_create(**{field: value}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[1] == [field]


async def test_missing_request_id_is_invalid_argument(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.CreateMerchant(_create(""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[1] == ["request_id"]


async def test_merchant_without_webhook_or_with_loopback_http_webhook_is_accepted(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    none = await merchants.CreateMerchant(_create("r1", webhook_url=""))
    local = await merchants.CreateMerchant(_create("r2", webhook_url="http://127.0.0.1:8080/h"))
    assert none.merchant.webhook_url == ""
    assert local.merchant.webhook_url == "http://127.0.0.1:8080/h"


async def test_unknown_merchant_is_not_found_with_reason_merchant_not_found(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.GetMerchant(merchant_pb2.GetMerchantRequest(merchant_id="m_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _details(caught.value)[0] == "MERCHANT_NOT_FOUND"


async def test_malformed_merchant_id_is_invalid_argument(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.GetMerchant(merchant_pb2.GetMerchantRequest(merchant_id="m 1; drop"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_suspension_changes_status_and_records_the_reason(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant
    suspended = await merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id="s1",
            merchant_id=created.merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
            reason="chargeback ratio",
        )
    )
    assert suspended.merchant.status == merchant_pb2.MERCHANT_STATUS_SUSPENDED
    assert suspended.merchant.status_reason == "chargeback ratio"
    fetched = await merchants.GetMerchant(
        merchant_pb2.GetMerchantRequest(merchant_id=created.merchant_id)
    )
    assert fetched.merchant == suspended.merchant


async def test_suspending_a_suspended_merchant_keeps_the_first_change(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant

    def suspend(request_id: str, reason: str) -> merchant_pb2.UpdateMerchantStatusRequest:
        return merchant_pb2.UpdateMerchantStatusRequest(
            request_id=request_id,
            merchant_id=created.merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
            reason=reason,
        )

    first = await merchants.UpdateMerchantStatus(suspend("s1", "chargeback ratio"))
    second = await merchants.UpdateMerchantStatus(suspend("s2", "again"))
    assert second.merchant == first.merchant


async def test_replayed_status_update_returns_the_first_result(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant
    request = merchant_pb2.UpdateMerchantStatusRequest(
        request_id="s1",
        merchant_id=created.merchant_id,
        status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
    )
    first = await merchants.UpdateMerchantStatus(request)
    await merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id="s2",
            merchant_id=created.merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_ACTIVE,
        )
    )
    again = await merchants.UpdateMerchantStatus(request)
    assert again.merchant == first.merchant


@pytest.mark.parametrize("status", [merchant_pb2.MERCHANT_STATUS_UNSPECIFIED, 7])
async def test_status_update_to_no_concrete_status_is_invalid_argument(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub, status: int
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.UpdateMerchantStatus(
            merchant_pb2.UpdateMerchantStatusRequest(
                request_id="s1",
                merchant_id=created.merchant_id,
                status=status,  # type: ignore[arg-type]  # out-of-range on purpose
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_status_update_of_unknown_merchant_is_not_found(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.UpdateMerchantStatus(
            merchant_pb2.UpdateMerchantStatusRequest(
                request_id="s1",
                merchant_id="m_missing",
                status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pages_cover_every_merchant_once_newest_first(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = [
        (await merchants.CreateMerchant(_create(f"r{index}"))).merchant.merchant_id
        for index in range(7)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await merchants.ListMerchants(
            merchant_pb2.ListMerchantsRequest(page_size=3, page_token=token)
        )
        seen.extend(m.merchant_id for m in page.merchants)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(created))


async def test_list_filters_by_status(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    active = (await merchants.CreateMerchant(_create("r1"))).merchant
    suspended = (await merchants.CreateMerchant(_create("r2"))).merchant
    await merchants.UpdateMerchantStatus(
        merchant_pb2.UpdateMerchantStatusRequest(
            request_id="s1",
            merchant_id=suspended.merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_SUSPENDED,
        )
    )
    listed = await merchants.ListMerchants(
        merchant_pb2.ListMerchantsRequest(status=merchant_pb2.MERCHANT_STATUS_ACTIVE)
    )
    assert [m.merchant_id for m in listed.merchants] == [active.merchant_id]


async def test_page_token_of_another_filter_is_rejected(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    for index in range(3):
        await merchants.CreateMerchant(_create(f"r{index}"))
    page = await merchants.ListMerchants(merchant_pb2.ListMerchantsRequest(page_size=1))
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.ListMerchants(
            merchant_pb2.ListMerchantsRequest(
                status=merchant_pb2.MERCHANT_STATUS_SUSPENDED, page_token=page.next_page_token
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(caught.value)[0] == "PAGE_TOKEN_INVALID"


async def test_dashboard_of_unknown_merchant_is_not_found(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await merchants.GetMerchantDashboard(
            merchant_pb2.GetMerchantDashboardRequest(merchant_id="m_missing")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _details(caught.value)[0] == "MERCHANT_NOT_FOUND"


async def test_dashboard_answers_with_every_section_unavailable_when_no_downstream_listens(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
) -> None:
    created = (await merchants.CreateMerchant(_create())).merchant
    dashboard = await merchants.GetMerchantDashboard(
        merchant_pb2.GetMerchantDashboardRequest(merchant_id=created.merchant_id)
    )
    assert dashboard.merchant == created
    sections = [
        dashboard.payments.section,
        dashboard.balances.section,
        dashboard.stats.section,
        dashboard.risk.section,
        dashboard.notifications.section,
    ]
    assert [s.source_service for s in sections] == list(DOWNSTREAMS)
    for section in sections:
        assert section.availability == merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE
        assert section.reason in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
        assert section.message
    assert not dashboard.HasField("payments") or not dashboard.payments.HasField("summary")
    assert not dashboard.balances.balances
    assert not dashboard.notifications.recent_notifications


async def test_dashboard_fills_sections_of_running_downstreams_and_marks_the_rest_unavailable(
    tmp_path: Path,
) -> None:
    var = {"PAYMESH_VAR_DIR": str(tmp_path)}
    async with (
        running_service("accounting-service", build_accounting, environ=var) as accounting,
        running_service("analytics-service", build_analytics, environ=var) as analytics,
        running_service(
            "merchant-service",
            build,
            environ=_environ(
                tmp_path, **{"accounting-service": accounting, "analytics-service": analytics}
            ),
        ) as address,
        _operator(address) as merchants,
    ):
        created = (await merchants.CreateMerchant(_create())).merchant
        dashboard = await merchants.GetMerchantDashboard(
            merchant_pb2.GetMerchantDashboardRequest(merchant_id=created.merchant_id)
        )
    available = merchant_pb2.SECTION_AVAILABILITY_AVAILABLE
    unavailable = merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE
    assert dashboard.balances.section.availability == available
    assert dashboard.stats.section.availability == available
    assert dashboard.stats.stats.merchant_id == created.merchant_id
    for section in (dashboard.payments, dashboard.risk, dashboard.notifications):
        assert section.section.availability == unavailable
        assert section.section.reason in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}


def _failed_call(code: grpc.StatusCode, reason: Reason | None = None) -> CallError:
    """A failed call as the chain raises it, with the peer's ErrorInfo when ``reason``."""
    trailing = aio.Metadata()
    if reason is not None:
        status = rich_status(code, "peer says no", domain="risk-service", reason=reason)
        trailing = aio.Metadata((STATUS_DETAILS_KEY, status.SerializeToString()))
    return from_grpc_error(aio.AioRpcError(code, aio.Metadata(), trailing, "peer says no", None))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (_failed_call(grpc.StatusCode.UNAVAILABLE), "DOWNSTREAM_UNAVAILABLE"),
        (_failed_call(grpc.StatusCode.DEADLINE_EXCEEDED), "DEADLINE_EXHAUSTED"),
        (
            _failed_call(grpc.StatusCode.UNAVAILABLE, Reason.RETRY_BUDGET_EXHAUSTED),
            "RETRY_BUDGET_EXHAUSTED",
        ),
        (
            circuit_open_error(
                caller="merchant-service",
                target="risk-service",
                method="/paymesh.risk.v1.RiskService/GetRiskSummary",
                retry_after_s=30.0,
            ),
            "CIRCUIT_OPEN",
        ),
    ],
)
def test_unavailable_section_names_the_reason_of_the_failed_call(
    error: CallError, reason: str
) -> None:
    section = unavailable_section("risk-service", error)
    assert section.availability == merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE
    assert section.source_service == "risk-service"
    assert section.reason == reason
    assert error.code().name in section.message


@dataclass(slots=True)
class DashboardMesh:
    """merchant-service over its five real downstreams, each of which a test may stop."""

    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub
    downstreams: dict[str, contextlib.AsyncExitStack]
    public: str
    """merchant-service's public port (merchants, with an API key)."""

    async def stop(self, name: str) -> None:
        """Stop downstream ``name`` (its port then refuses connections)."""
        await self.downstreams[name].aclose()


@contextlib.asynccontextmanager
async def _dashboard_mesh(
    tmp_path: Path, *, merchant_auth: str = ""
) -> AsyncIterator[DashboardMesh]:
    builders: dict[str, Builder] = {
        "payment-gateway": build_gateway,
        "accounting-service": build_accounting,
        "analytics-service": build_analytics,
        "risk-service": build_risk,
        "notification-service": build_notification,
    }
    topology = Topology(environ={})
    downstreams: dict[str, contextlib.AsyncExitStack] = {}
    addresses: dict[str, str] = {}
    try:
        for name, builder in builders.items():
            # The downstreams' own downstreams and partners are silent: the dashboard reads
            # only what each keeps in its own store.
            environ = {"PAYMESH_VAR_DIR": str(tmp_path), "PARTNER_SANDBOX_ADDR": _silent_address()}
            for target in topology.service(name).calls:
                environ[f"{env_prefix(target)}_ADDR"] = _silent_address()
            downstreams[name] = contextlib.AsyncExitStack()
            addresses[name] = await downstreams[name].enter_async_context(
                running_service(name, builder, environ=environ)
            )
        if merchant_auth:
            addresses["merchant-auth-service"] = merchant_auth
        async with (
            running_service(
                "merchant-service", build, environ=_environ(tmp_path, **addresses)
            ) as address,
            _operator(address) as merchants,
        ):
            yield DashboardMesh(merchants, downstreams, address.public)
    finally:
        for stack in reversed(downstreams.values()):
            await stack.aclose()


async def test_dashboard_fills_every_section_when_all_five_downstreams_answer(
    tmp_path: Path,
) -> None:
    async with _dashboard_mesh(tmp_path) as mesh:
        created = (await mesh.merchants.CreateMerchant(_create())).merchant
        dashboard = await mesh.merchants.GetMerchantDashboard(
            merchant_pb2.GetMerchantDashboardRequest(merchant_id=created.merchant_id)
        )
    sections = [
        dashboard.payments.section,
        dashboard.balances.section,
        dashboard.stats.section,
        dashboard.risk.section,
        dashboard.notifications.section,
    ]
    assert [s.source_service for s in sections] == list(DOWNSTREAMS)
    assert {s.availability for s in sections} == {merchant_pb2.SECTION_AVAILABILITY_AVAILABLE}
    assert dashboard.payments.summary.merchant_id == created.merchant_id
    assert dashboard.risk.summary.merchant_id == created.merchant_id


async def test_dashboard_answers_partially_while_one_downstream_process_is_stopped(
    tmp_path: Path,
) -> None:
    async with _dashboard_mesh(tmp_path) as mesh:
        created = (await mesh.merchants.CreateMerchant(_create())).merchant
        await mesh.stop("risk-service")
        dashboard = await mesh.merchants.GetMerchantDashboard(
            merchant_pb2.GetMerchantDashboardRequest(merchant_id=created.merchant_id)
        )
    assert dashboard.merchant == created
    assert dashboard.risk.section.availability == merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE
    assert dashboard.risk.section.reason in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
    assert not dashboard.risk.HasField("summary")
    others = [
        dashboard.payments.section,
        dashboard.balances.section,
        dashboard.stats.section,
        dashboard.notifications.section,
    ]
    assert {s.availability for s in others} == {merchant_pb2.SECTION_AVAILABILITY_AVAILABLE}
    assert dashboard.payments.summary.merchant_id == created.merchant_id


# -- merchants calling with their API key -----------------------------------------------------

#: A well-formed merchant id no merchant has.
MISSING_MERCHANT = "m_000000000000000000000000"


@dataclass(slots=True)
class MerchantFacing:
    """merchant-service checking keys at a real merchant-auth, and the merchants it knows."""

    directory: Directory
    public: str
    """The public port of the merchant-service under test."""

    def as_merchant(self, secret: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """A stub of the public port calling with API key ``secret``."""
        return merchant_stub(self.public, merchant_pb2_grpc.MerchantServiceStub, secret)


@pytest.fixture
async def facing(tmp_path: Path) -> AsyncIterator[MerchantFacing]:
    # Same var dir as the directory's merchant-service: one database, so the merchants the
    # directory onboards are the ones the service under test reads.
    async with (
        merchant_directory(tmp_path) as directory,
        running_service(
            "merchant-service",
            build,
            environ=_environ(tmp_path, **{"merchant-auth-service": directory.auth_address}),
        ) as address,
    ):
        yield MerchantFacing(directory, address.public)


async def test_merchant_reads_itself_with_an_empty_or_its_own_merchant_id(
    facing: MerchantFacing,
) -> None:
    tenant = await facing.directory.onboard("Kaffeehaus")
    async with facing.as_merchant(tenant.secret) as merchants:
        implicit = await merchants.GetMerchant(merchant_pb2.GetMerchantRequest())
        explicit = await merchants.GetMerchant(
            merchant_pb2.GetMerchantRequest(merchant_id=tenant.merchant_id)
        )
    assert implicit.merchant.merchant_id == tenant.merchant_id
    assert explicit == implicit


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("GetMerchant", merchant_pb2.GetMerchantRequest),
        ("GetMerchantDashboard", merchant_pb2.GetMerchantDashboardRequest),
    ],
)
async def test_another_merchant_is_not_found_exactly_like_a_missing_one(
    facing: MerchantFacing, method: str, request_type: Any
) -> None:
    tenant = await facing.directory.onboard("Kaffeehaus")
    other = await facing.directory.onboard("Other Shop")
    async with facing.as_merchant(tenant.secret) as merchants:
        call = getattr(merchants, method)
        with pytest.raises(aio.AioRpcError) as foreign:
            await call(request_type(merchant_id=other.merchant_id))
        with pytest.raises(aio.AioRpcError) as missing:
            await call(request_type(merchant_id=MISSING_MERCHANT))
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(foreign.value) == "MERCHANT_NOT_FOUND"
    assert refusal(foreign.value, resource_id=other.merchant_id) == refusal(
        missing.value, resource_id=MISSING_MERCHANT
    )


async def test_merchant_builds_its_own_dashboard_and_not_another(
    facing: MerchantFacing,
) -> None:
    tenant = await facing.directory.onboard("Kaffeehaus")
    other = await facing.directory.onboard("Other Shop")
    async with facing.as_merchant(tenant.secret) as merchants:
        dashboard = await merchants.GetMerchantDashboard(merchant_pb2.GetMerchantDashboardRequest())
        with pytest.raises(aio.AioRpcError) as caught:
            await merchants.GetMerchantDashboard(
                merchant_pb2.GetMerchantDashboardRequest(merchant_id=other.merchant_id)
            )
    assert dashboard.merchant.merchant_id == tenant.merchant_id
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_merchant_call_without_api_key_is_credentials_missing(
    facing: MerchantFacing,
) -> None:
    async with public_channel(facing.public) as channel:
        merchants = merchant_pb2_grpc.MerchantServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await merchants.GetMerchant(merchant_pb2.GetMerchantRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "CREDENTIALS_MISSING"


async def test_merchant_call_with_a_bad_api_key_is_unauthenticated(
    facing: MerchantFacing,
) -> None:
    async with facing.as_merchant("sk_0123456789abcdef_" + "A" * 43) as merchants:
        with pytest.raises(aio.AioRpcError) as caught:
            await merchants.GetMerchantDashboard(merchant_pb2.GetMerchantDashboardRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(caught.value) == "API_KEY_INVALID"


@pytest.mark.parametrize("method", ["ListMerchants", "CreateMerchant", "UpdateMerchantStatus"])
async def test_operator_methods_are_refused_to_a_merchant_key(
    facing: MerchantFacing, method: str
) -> None:
    tenant = await facing.directory.onboard("Kaffeehaus")
    requests = {
        "ListMerchants": merchant_pb2.ListMerchantsRequest(),
        "CreateMerchant": _create("r-evil"),
        "UpdateMerchantStatus": merchant_pb2.UpdateMerchantStatusRequest(
            request_id="s1",
            merchant_id=tenant.merchant_id,
            status=merchant_pb2.MERCHANT_STATUS_ACTIVE,
        ),
    }
    async with facing.as_merchant(tenant.secret) as merchants:
        with pytest.raises(aio.AioRpcError) as caught:
            await getattr(merchants, method)(requests[method])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_key_never_appears_in_merchant_service_logs(
    facing: MerchantFacing, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = await facing.directory.onboard("Kaffeehaus")
    other = await facing.directory.onboard("Other Shop")
    caplog.set_level(logging.DEBUG)
    async with facing.as_merchant(tenant.secret) as merchants:
        await merchants.GetMerchant(merchant_pb2.GetMerchantRequest())
        await merchants.GetMerchantDashboard(merchant_pb2.GetMerchantDashboardRequest())
        with pytest.raises(aio.AioRpcError):
            await merchants.GetMerchant(
                merchant_pb2.GetMerchantRequest(merchant_id=other.merchant_id)
            )
    assert any("rpc method=" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = " ".join((record.getMessage(), repr(record.args), record.exc_text or ""))
        assert tenant.secret_body not in text, record


async def test_merchant_dashboard_reads_every_section_for_the_merchant_as_a_mesh_caller(
    tmp_path: Path,
) -> None:
    async with merchant_directory(tmp_path) as directory:
        async with _dashboard_mesh(tmp_path, merchant_auth=directory.auth_address) as mesh:
            tenant = await directory.onboard("Kaffeehaus")
            async with merchant_stub(
                mesh.public, merchant_pb2_grpc.MerchantServiceStub, tenant.secret
            ) as merchants:
                dashboard = await merchants.GetMerchantDashboard(
                    merchant_pb2.GetMerchantDashboardRequest()
                )
    sections = [
        dashboard.payments.section,
        dashboard.balances.section,
        dashboard.stats.section,
        dashboard.risk.section,
        dashboard.notifications.section,
    ]
    assert {s.availability for s in sections} == {merchant_pb2.SECTION_AVAILABILITY_AVAILABLE}
    assert dashboard.payments.summary.merchant_id == tenant.merchant_id
    assert dashboard.stats.stats.merchant_id == tenant.merchant_id
