"""The payment platform end to end through real processes: every seed edge live over gRPC.

Onboarding → payment → refund → dashboard → settlement → withdrawal, each service's state
checked afterwards through its own RPCs; the dashboard answering partially while one of
its downstream processes is stopped; the gateway process killed with -9 at each of
the six steps of a payment (held there by its test hook, checked in its database),
recovering on restart with exactly one charge and a balanced ledger; and a second mesh with
every store on PostgreSQL (``DATABASE_URL``), its ledger balanced after a whole flow.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from paymesh.channel_adapter.v1 import channel_adapter_pb2, channel_adapter_pb2_grpc
from paymesh.common.v1 import common_pb2
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from paymesh.order.v1 import order_pb2, order_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as gw
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.mesh.admin_token import FAULT_INJECTION_VAR, admin_authorization, with_admin_token
from services.mesh.bootstrap import SHARED_DATABASE_VAR
from services.mesh.topology import SERVICES, Topology
from services.payment_gateway.flow import HOLD_FILE_VAR
from services.payment_gateway.store import Step
from services.tools.launcher import Mesh, ephemeral_environ
from services.tools.postgres import LocalCluster

pytestmark = pytest.mark.slow
BUF = Path(sys.executable).parent / "buf"
TERMINAL = {
    gw.PAYMENT_STATUS_SUCCEEDED,
    gw.PAYMENT_STATUS_DECLINED,
    gw.PAYMENT_STATUS_FAILED,
    gw.PAYMENT_STATUS_VOIDED,
}


@dataclass
class Clients:
    """Stubs of every service of a running mesh: the operator's over mTLS, and the merchant's
    view of the gateway and merchant-service (their public TLS ports, API key in metadata)."""

    mesh: Mesh
    channels: list[grpc.Channel]

    def _channel(self, name: str) -> grpc.Channel:
        # From the topology, not the members: channels connect lazily, so a mesh of only
        # some services (the traces test's) gets stubs for all of them.
        channel = self.mesh.operator.sync_channel(name, self.mesh.topology.dial(name).target)
        self.channels.append(channel)
        return channel

    def _public(self, name: str) -> grpc.Channel:
        files = self.mesh.operator.files
        assert files is not None
        channel = grpc.secure_channel(
            self.mesh.members[name].public_address,
            grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes()),
            options=[("grpc.ssl_target_name_override", name)],
        )
        self.channels.append(channel)
        return channel

    def __post_init__(self) -> None:
        self.pay = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(
            self._public("payment-gateway")
        )
        self.my_profile = merchant_pb2_grpc.MerchantServiceStub(self._public("merchant-service"))
        self.merchants = merchant_pb2_grpc.MerchantServiceStub(self._channel("merchant-service"))
        self.auth = merchant_auth_pb2_grpc.MerchantAuthServiceStub(
            self._channel("merchant-auth-service")
        )
        self.gateway = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(
            self._channel("payment-gateway")
        )
        self.orders = order_pb2_grpc.OrderServiceStub(self._channel("order-service"))
        self.channel = channel_adapter_pb2_grpc.ChannelAdapterServiceStub(
            self._channel("channel-adapter")
        )
        self.ledger = accounting_pb2_grpc.AccountingServiceStub(self._channel("accounting-service"))
        self.notifications = notification_pb2_grpc.NotificationServiceStub(
            self._channel("notification-service")
        )
        self.analytics = analytics_pb2_grpc.AnalyticsServiceStub(self._channel("analytics-service"))
        self.settlements = settlement_pb2_grpc.SettlementServiceStub(
            self._channel("settlement-service")
        )
        self.withdrawals = withdrawal_pb2_grpc.WithdrawalServiceStub(
            self._channel("withdrawal-service")
        )

    def sandbox(self, path: str) -> object:
        address = Topology(environ=self.mesh.environ).sandbox_address()
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as reply:
            return json.loads(reply.read())

    def admin(self, name: str, method: str, path: str, body: object = None) -> object:
        address = Topology(environ=self.mesh.environ).admin_address(name)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://{address}{path}",
            data=data,
            method=method,
            headers=admin_authorization(self.mesh.environ),
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    var_dir = tmp_path_factory.mktemp("flow")
    environ = with_admin_token({**ephemeral_environ(), FAULT_INJECTION_VAR: "1"}, var_dir)
    # The kill tests hold a payment at one step by naming it in this file.
    environ[HOLD_FILE_VAR] = str(var_dir / "gateway-hold")
    with running_clients(Mesh(environ=environ, var_dir=var_dir), timeout_s=90) as made:
        yield made


@contextlib.contextmanager
def running_clients(mesh: Mesh, *, timeout_s: float) -> Iterator[Clients]:
    """``mesh`` started, with clients of it, for the block; then both closed."""
    mesh.start(timeout_s=timeout_s)
    made = Clients(mesh, [])
    try:
        yield made
    finally:
        for channel in made.channels:
            channel.close()
        mesh.stop()


def _onboard(clients: Clients, name: str = "Kaffeehaus Zentral") -> tuple[str, str]:
    merchant = clients.merchants.CreateMerchant(
        merchant_pb2.CreateMerchantRequest(
            request_id=f"onboard-{uuid.uuid4().hex[:12]}",
            name=name,
            email="billing@kaffeehaus.example",
            country_code="DE",
            default_currency_code="EUR",
            webhook_url="http://127.0.0.1/webhooks",
        ),
        timeout=10,
    ).merchant
    issued = clients.auth.IssueApiKey(
        merchant_auth_pb2.IssueApiKeyRequest(
            request_id=f"key-{uuid.uuid4().hex[:12]}", merchant_id=merchant.merchant_id
        ),
        timeout=10,
    )
    return merchant.merchant_id, issued.secret


def _key(api_key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {api_key}"),)


def _payment(merchant_id: str, request_id: str, amount: int = 4200) -> gw.CreatePaymentRequest:
    return gw.CreatePaymentRequest(
        request_id=request_id,
        merchant_id=merchant_id,
        amount=common_pb2.Money(amount_minor=amount, currency_code="EUR"),
        payment_method_token="tok_visa",
        customer_ip="192.0.2.10",
        customer_country_code="DE",
        description="two flat whites",
    )


def _refund(
    clients: Clients, api_key: str, payment_id: str, request_id: str
) -> gw.RefundPaymentResponse:
    """The merchant refunds 12.00 EUR of the payment (one coffee)."""
    return clients.pay.RefundPayment(
        gw.RefundPaymentRequest(
            request_id=request_id,
            payment_id=payment_id,
            amount=common_pb2.Money(amount_minor=1200, currency_code="EUR"),
            reason="one coffee spilled",
        ),
        timeout=30,
        metadata=_key(api_key),
    )


def _settle(clients: Clients, merchant_id: str, request_id: str) -> settlement_pb2.Settlement:
    """The operator settles the merchant's whole EUR balance to its bank account."""
    return clients.settlements.CreateSettlement(
        settlement_pb2.CreateSettlementRequest(
            request_id=request_id,
            merchant_id=merchant_id,
            currency_code="EUR",
            bank_account_reference="DE89370400440532013000",
        ),
        timeout=30,
    ).settlement


def _eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.05)


def _balance(clients: Clients, account: str, currency: str = "EUR") -> int:
    reply = clients.ledger.GetBalance(
        accounting_pb2.GetBalanceRequest(account_id=account, currency_code=currency), timeout=10
    )
    return int(reply.balance.balance.amount_minor)


def test_onboarding_payment_refund_dashboard_settlement_withdrawal(clients: Clients) -> None:
    merchant_id, api_key = _onboard(clients)
    who = clients.my_profile.GetMerchant(
        merchant_pb2.GetMerchantRequest(), timeout=10, metadata=_key(api_key)
    )
    assert who.merchant.merchant_id == merchant_id

    payment = clients.pay.CreatePayment(
        _payment(merchant_id, "order-1001"), timeout=30, metadata=_key(api_key)
    ).payment
    assert payment.status == gw.PAYMENT_STATUS_SUCCEEDED, payment.failure_reason

    def order_paid() -> bool:
        # Sent by the gateway's outbox after the answer, with the webhook and the event.
        order = clients.orders.GetOrder(
            order_pb2.GetOrderRequest(order_id=payment.order_id), timeout=10
        )
        return order.order.status == order_pb2.ORDER_STATUS_PAID

    _eventually(order_paid)
    charges = clients.channel.ListCharges(
        channel_adapter_pb2.ListChargesRequest(payment_id=payment.payment_id), timeout=10
    ).charges
    assert len(charges) == 1
    transaction = clients.ledger.GetTransaction(
        accounting_pb2.GetTransactionRequest(transaction_id=payment.ledger_transaction_id),
        timeout=10,
    ).transaction
    assert transaction.transaction_id == payment.ledger_transaction_id
    assert _balance(clients, f"merchants/{merchant_id}/available") == 4200

    refund = _refund(clients, api_key, payment.payment_id, "refund-1")
    assert refund.payment.status == gw.PAYMENT_STATUS_PARTIALLY_REFUNDED
    assert _balance(clients, f"merchants/{merchant_id}/available") == 3000

    dashboard = clients.merchants.GetMerchantDashboard(
        merchant_pb2.GetMerchantDashboardRequest(merchant_id=merchant_id), timeout=30
    )
    sections = [
        part.section
        for part in (
            dashboard.payments,
            dashboard.balances,
            dashboard.stats,
            dashboard.risk,
            dashboard.notifications,
        )
    ]
    assert all(s.availability == merchant_pb2.SECTION_AVAILABILITY_AVAILABLE for s in sections), (
        sections
    )

    # Events and webhooks leave the gateway's outbox after its answers: wait for them.
    def announced() -> bool:
        stats = clients.analytics.GetMerchantStats(
            analytics_pb2.GetMerchantStatsRequest(merchant_id=merchant_id), timeout=10
        ).stats
        sent = clients.notifications.ListNotifications(
            notification_pb2.ListNotificationsRequest(merchant_id=merchant_id), timeout=10
        ).notifications
        # The payment's success and its refund, in analytics and as webhooks.
        return stats.success_rate_bps == 10000 and len(sent) >= 2

    _eventually(announced)

    settlement = _settle(clients, merchant_id, "settle-1")
    assert settlement.amount.amount_minor == 3000
    assert settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED, settlement
    withdrawal = clients.withdrawals.GetWithdrawal(
        withdrawal_pb2.GetWithdrawalRequest(withdrawal_id=settlement.withdrawal_id), timeout=10
    ).withdrawal
    assert withdrawal.status == withdrawal_pb2.WITHDRAWAL_STATUS_COMPLETED
    assert _balance(clients, f"merchants/{merchant_id}/available") == 0
    assert _balance(clients, "platform/bank_payouts") >= 3000


def test_create_payment_through_buf_curl_and_replay(clients: Clients) -> None:
    _, api_key = _onboard(clients, "Buf Curl Bakery")
    body = {
        "request_id": "curl-1",
        "amount": {"amount_minor": "990", "currency_code": "EUR"},
        "payment_method_token": "tok_visa",
        "customer_ip": "192.0.2.44",
        "customer_country_code": "DE",
    }
    # As a merchant: the public TLS port, the mesh CA to verify it, the key as a header.
    url = (
        f"https://{clients.mesh.members['payment-gateway'].public_address}"
        "/paymesh.payment_gateway.v1.PaymentGatewayService/CreatePayment"
    )
    files = clients.mesh.operator.files
    assert files is not None
    schema = str(Path(__file__).resolve().parents[2] / "protos")
    command = [str(BUF), "curl", "--protocol", "grpc", "--schema", schema]
    command += ["--cacert", str(files.ca), "-H", f"authorization: Bearer {api_key}", "-d"]
    first = subprocess.run(
        [*command, json.dumps(body), url], capture_output=True, text=True, check=False, timeout=60
    )
    again = subprocess.run(
        [*command, json.dumps(body), url], capture_output=True, text=True, check=False, timeout=60
    )
    assert first.returncode == 0, first.stderr
    paid = json.loads(first.stdout)["payment"]
    assert paid["status"] == "PAYMENT_STATUS_SUCCEEDED"
    assert json.loads(again.stdout)["payment"]["paymentId"] == paid["paymentId"]
    charges = clients.sandbox(f"/payment-channel/charges?reference={paid['paymentId']}")
    assert isinstance(charges, dict)
    assert len(charges["charges"]) == 1


def test_dashboard_answers_partially_while_a_downstream_process_is_stopped(
    clients: Clients,
) -> None:
    merchant_id, _ = _onboard(clients, "Partial Pantry")
    clients.mesh.signal("analytics-service", signal.SIGTERM)
    assert clients.mesh.members["analytics-service"].process is not None
    clients.mesh.members["analytics-service"].process.wait(timeout=30)
    try:
        dashboard = clients.merchants.GetMerchantDashboard(
            merchant_pb2.GetMerchantDashboardRequest(merchant_id=merchant_id), timeout=30
        )
        assert dashboard.stats.section.availability == merchant_pb2.SECTION_AVAILABILITY_UNAVAILABLE
        assert dashboard.stats.section.reason in {"DOWNSTREAM_UNAVAILABLE", "CIRCUIT_OPEN"}
        assert (
            dashboard.payments.section.availability == merchant_pb2.SECTION_AVAILABILITY_AVAILABLE
        )
        assert (
            dashboard.balances.section.availability == merchant_pb2.SECTION_AVAILABILITY_AVAILABLE
        )
    finally:
        clients.mesh.start_member("analytics-service")
        clients.mesh.wait_ready(["analytics-service"], timeout_s=60)


def _hold_file(clients: Clients) -> Path:
    return Path(clients.mesh.environ[HOLD_FILE_VAR])


def _gateway_step(clients: Clients, merchant_id: str) -> list[str]:
    """The step column of the merchant's payments, read from the gateway's own database."""
    database = clients.mesh.var_dir / "payment-gateway.db"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT step FROM payments WHERE merchant_id = ?", (merchant_id,))
        return [str(step) for (step,) in rows]


def killed_while_paying(
    clients: Clients,
    request: gw.CreatePaymentRequest,
    api_key: str,
    step: str,
    held: Callable[[], bool],
) -> object:
    """Pay through the gateway's (replica 0's) public port while the gateway holds payments
    at ``step`` (its test hook, so the kill lands on that step whatever the machine's speed),
    kill it with -9 once ``held()`` says the payment rests there; the caller's outcome."""
    hold = _hold_file(clients)
    hold.write_text(step)
    outcome: list[object] = []

    def pay() -> None:
        try:
            outcome.append(clients.pay.CreatePayment(request, timeout=60, metadata=_key(api_key)))
        except grpc.RpcError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=pay)
    caller.start()
    try:
        _eventually(held)
        clients.mesh.signal("payment-gateway", signal.SIGKILL)
        caller.join(timeout=30)
    finally:
        hold.unlink()
    return outcome[0]


def recovered_payment(clients: Clients, merchant_id: str) -> gw.Payment:
    """The merchant's only payment once recovery finished it; it must have SUCCEEDED."""
    (payment_id,) = (
        p.payment_id
        for p in clients.gateway.ListPayments(
            gw.ListPaymentsRequest(merchant_id=merchant_id), timeout=10
        ).payments
    )
    final = gw.Payment()
    deadline = time.monotonic() + 60
    while final.status not in TERMINAL and time.monotonic() < deadline:
        final = clients.gateway.GetPayment(
            gw.GetPaymentRequest(payment_id=payment_id), timeout=10
        ).payment
        time.sleep(0.1)
    assert final.status == gw.PAYMENT_STATUS_SUCCEEDED, final
    return final


def assert_charged_once(clients: Clients, merchant_id: str, payment_id: str, amount: int) -> None:
    """One captured charge at the channel, and the ledger holds the amount once."""
    charges = clients.sandbox(f"/payment-channel/charges?reference={payment_id}")
    assert isinstance(charges, dict)
    assert [c["status"] for c in charges["charges"]] == ["captured"]
    assert _balance(clients, f"merchants/{merchant_id}/available") == amount
    entries = clients.ledger.ListEntries(
        accounting_pb2.ListEntriesRequest(account_id=f"merchants/{merchant_id}/available"),
        timeout=10,
    ).entries
    assert len(entries) == 1


@pytest.fixture(scope="module")
def postgres_clients(
    tmp_path_factory: pytest.TempPathFactory, postgres_cluster: LocalCluster
) -> Iterator[Clients]:
    """A second process mesh, every service's store in one PostgreSQL database."""
    var_dir = tmp_path_factory.mktemp("flow-postgres")
    environ = {
        **ephemeral_environ(),
        SHARED_DATABASE_VAR: postgres_cluster.create_database("flow_processes"),
    }
    with running_clients(Mesh(environ=environ, var_dir=var_dir), timeout_s=90) as made:
        yield made


def test_a_payment_refund_and_settlement_on_postgresql_leave_the_ledger_balanced(
    postgres_clients: Clients,
) -> None:
    clients = postgres_clients
    merchant_id, api_key = _onboard(clients)
    payment = clients.pay.CreatePayment(
        _payment(merchant_id, "order-pg-1"), timeout=30, metadata=_key(api_key)
    ).payment
    assert payment.status == gw.PAYMENT_STATUS_SUCCEEDED, payment.failure_reason
    again = clients.pay.CreatePayment(
        _payment(merchant_id, "order-pg-1"), timeout=30, metadata=_key(api_key)
    ).payment
    assert again == payment  # the replay, from the gateway's PostgreSQL schema
    _refund(clients, api_key, payment.payment_id, "refund-pg-1")
    settlement = _settle(clients, merchant_id, "settle-pg-1")
    assert settlement.status == settlement_pb2.SETTLEMENT_STATUS_COMPLETED, settlement
    assert settlement.amount.amount_minor == 3000
    assert _balance(clients, f"merchants/{merchant_id}/available") == 0
    charges = clients.channel.ListCharges(
        channel_adapter_pb2.ListChargesRequest(payment_id=payment.payment_id), timeout=10
    ).charges
    assert len(charges) == 1
    url = clients.mesh.environ[SHARED_DATABASE_VAR]
    with psycopg.connect(url) as conn:
        debit, credit, count = conn.execute(
            "SELECT SUM(amount_minor) FILTER (WHERE direction = %s),"
            " SUM(amount_minor) FILTER (WHERE direction = %s), COUNT(*)"
            " FROM accounting_service.entries",
            (accounting_pb2.ENTRY_DIRECTION_DEBIT, accounting_pb2.ENTRY_DIRECTION_CREDIT),
        ).fetchone() or (None, None, 0)
        schemas = {
            row[0] for row in conn.execute("SELECT schema_name FROM information_schema.schemata")
        }
    assert count >= 6 and debit == credit
    assert {s.name.replace("-", "_") for s in SERVICES} <= schemas


@pytest.mark.parametrize(
    "step",
    # The steps a payment rests at (ASSESSED, ORDERED and POSTED are folded into the next
    # commit).
    [Step.CREATED, Step.CHARGING, Step.CHARGED],
)
def test_gateway_killed_at_each_step_recovers_with_one_charge_and_a_balanced_ledger(
    clients: Clients, step: str
) -> None:
    merchant_id, api_key = _onboard(clients, f"Crash Cafe {step}")
    request = _payment(merchant_id, f"crash-{step}", amount=777)
    outcome = killed_while_paying(
        clients, request, api_key, step, lambda: _gateway_step(clients, merchant_id) == [step]
    )
    assert isinstance(outcome, grpc.RpcError)  # the caller saw the connection drop
    assert _gateway_step(clients, merchant_id) == [step]  # killed at that step, not later

    clients.mesh.start_member("payment-gateway")
    clients.mesh.wait_ready(["payment-gateway"], timeout_s=60)
    final = recovered_payment(clients, merchant_id)
    payment_id = final.payment_id

    # The merchant's retry with the same key replays the outcome instead of paying again.
    replay = clients.pay.CreatePayment(request, timeout=30, metadata=_key(api_key)).payment
    assert (replay.payment_id, replay.status) == (payment_id, final.status)

    assert_charged_once(clients, merchant_id, payment_id, 777)
