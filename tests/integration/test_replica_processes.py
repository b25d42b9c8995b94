"""Two gateway and two order-service processes on one database: leases, status, a kill -9.

The launcher's mesh with ``replicas``: callers dial every replica, ``make status`` has a row
per replica, and a gateway replica killed with -9 while it holds a payment (the gateway's
hold-file test hook) leaves it to its peer, which takes the payment's lease over once it
expired and completes it: one charge at the channel, a balanced ledger. The database is each
service's SQLite file in the mesh's var dir, shared by its replicas; then the same tests run
again with the launcher's own PostgreSQL and Redis (``--engines postgresql,redis``: one
database, a schema per service, shared caches), as ``make run-replicas`` runs them.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import grpc
import pytest

from paymesh.payment_gateway.v1 import payment_gateway_pb2 as gw
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from services.mesh.admin_token import FAULT_INJECTION_VAR, with_admin_token
from services.payment_gateway.flow import HOLD_FILE_VAR
from services.payment_gateway.store import Step
from services.storage.leases import LEASE_VAR
from services.tools import postgres, redis_server
from services.tools.launcher import LocalEngine, Mesh, ephemeral_environ, free_port
from services.tools.status import SERVING, mesh_status
from tests.integration.test_payment_flow_processes import (
    Clients,
    _key,
    _onboard,
    _payment,
    assert_charged_once,
    killed_while_paying,
    recovered_payment,
    running_clients,
)

pytestmark = pytest.mark.slow

REPLICAS = {"payment-gateway": 2, "order-service": 2}
#: Short, so the survivor takes a dead replica's payment over within the test.
LEASE_S = 2
#: Status rounds the status test may take until every replica's row says SERVING.
STATUS_ROUNDS = 5


@pytest.fixture(scope="module", params=["sqlite", "postgresql+redis"])
def clients(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Clients]:
    var_dir = tmp_path_factory.mktemp("replicas")
    engines: list[LocalEngine] = []
    if request.param != "sqlite":
        if postgres.bin_dir() is None or redis_server.binary() is None:
            pytest.skip(
                "PostgreSQL or redis-server is not installed (apt-get install postgresql"
                " redis-server): the replicas on PostgreSQL and Redis are not run"
            )
        # The engines' own data outside the mesh's var dir: pytest's tmp dirs are 0700 to
        # root, and PostgreSQL runs as the postgres user.
        data_dir = postgres.temporary_directory()
        request.addfinalizer(lambda: shutil.rmtree(data_dir, ignore_errors=True))
        engines = [
            postgres.PostgresEngine(data_dir, port=free_port()),
            redis_server.RedisEngine(port=free_port()),
        ]
    environ = with_admin_token(
        {**ephemeral_environ(replicas=REPLICAS), FAULT_INJECTION_VAR: "1"}, var_dir
    )
    environ |= {
        HOLD_FILE_VAR: str(var_dir / "gateway-hold"),
        LEASE_VAR: str(LEASE_S),
        "PAYMENT_GATEWAY_RECOVERY_INTERVAL_S": "0.5",
    }
    mesh = Mesh(environ=environ, var_dir=var_dir, replicas=REPLICAS, engines=engines)
    with running_clients(mesh, timeout_s=120) as made:
        yield made


def _held(clients: Clients, member: str, step: str) -> bool:
    """Whether the member's log says it holds a payment at ``step`` (engine-independent)."""
    log = clients.mesh.members[member].log_path.read_text(errors="replace")
    return f"held at step {step} (test hook)" in log


def test_status_has_a_row_per_replica_each_serving(clients: Clients) -> None:
    names = {
        service: [service] + [f"{service}#{k}" for k in range(1, count)]
        for service, count in REPLICAS.items()
    }
    # A status round gives each health check 1 s; on a loaded machine a replica's first mTLS
    # handshake can take longer, so a few rounds are allowed before a row must say SERVING.
    for _ in range(STATUS_ROUNDS):
        rows = asyncio.run(mesh_status(clients.mesh.topology, clients.mesh.operator))
        by_name = {row.name: row for row in rows}
        if all(by_name[n].health == SERVING for group in names.values() for n in group):
            break
    for group in names.values():
        assert [by_name[name].health for name in group] == [SERVING] * len(group), [
            (name, by_name[name].error) for name in group
        ]
        assert len({by_name[name].address for name in group}) == len(group)


def test_payments_succeed_with_the_gateway_and_order_service_replicated(
    clients: Clients,
) -> None:
    merchant_id, api_key = _onboard(clients, "Zwei Baristas")
    for k in range(4):
        payment = clients.pay.CreatePayment(
            _payment(merchant_id, f"spread-{k}", amount=100 + k), timeout=30, metadata=_key(api_key)
        ).payment
        assert payment.status == gw.PAYMENT_STATUS_SUCCEEDED


@pytest.mark.parametrize("step", [Step.CHARGING, Step.CHARGED])
def test_gateway_replica_killed_mid_payment_leaves_it_to_its_peer_with_one_charge(
    clients: Clients, step: str
) -> None:
    mesh = clients.mesh
    merchant_id, api_key = _onboard(clients, f"Replica Cafe {step}")
    request = _payment(merchant_id, f"replica-{step}", amount=913)
    outcome = killed_while_paying(
        clients, request, api_key, step, lambda: _held(clients, "payment-gateway", step)
    )
    assert isinstance(outcome, grpc.RpcError)  # the caller saw its replica go

    # The survivor's recovery finds the payment leased to the dead replica until the lease
    # runs out, then takes it over; the operator's channel reaches whichever replica is up.
    final = recovered_payment(clients, merchant_id)
    payment_id = final.payment_id
    assert_charged_once(clients, merchant_id, payment_id, 913)

    # The merchant's retry, at the survivor's public port, replays the outcome.
    survivor = mesh.members["payment-gateway#1"].public_address
    with grpc.secure_channel(
        survivor,
        grpc.ssl_channel_credentials(root_certificates=_ca(clients)),
        options=[("grpc.ssl_target_name_override", "payment-gateway")],
    ) as channel:
        replay = (
            payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)
            .CreatePayment(request, timeout=30, metadata=_key(api_key))
            .payment
        )
    assert (replay.payment_id, replay.status) == (payment_id, final.status)

    mesh.start_member("payment-gateway")
    mesh.wait_ready(["payment-gateway"], timeout_s=60)


def _ca(clients: Clients) -> bytes:
    files = clients.mesh.operator.files
    assert files is not None
    return files.ca.read_bytes()
