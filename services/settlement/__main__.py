"""Start settlement-service: ``python -m services.settlement``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2_grpc
from services.mesh.bootstrap import Registration, ServiceContext, run
from services.settlement.servicer import SettlementServicer
from services.settlement.store import SettlementStore
from services.storage.resumable import recovery_interval_s

NAME = "settlement-service"


async def build(context: ServiceContext) -> list[Registration]:
    """The servicer over its store, the ledger, withdrawals, merchants and notifications;
    starts the recovery loop (every ``SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S``, default 10 s)."""
    interval_s = recovery_interval_s(NAME, context.environ)
    store = SettlementStore(context.database_path())
    servicer = SettlementServicer(
        store,
        ledger=context.clients.stub(
            "accounting-service", accounting_pb2_grpc.AccountingServiceStub
        ),
        withdrawals=context.clients.stub(
            "withdrawal-service", withdrawal_pb2_grpc.WithdrawalServiceStub
        ),
        merchants=context.clients.stub("merchant-service", merchant_pb2_grpc.MerchantServiceStub),
        notifications=context.clients.stub(
            "notification-service", notification_pb2_grpc.NotificationServiceStub
        ),
    )
    servicer.start_recovery(interval_s)
    context.on_stop.append(servicer.close)
    context.on_stop.append(store.close)
    return [
        Registration(
            servicer=servicer,
            add_to_server=settlement_pb2_grpc.add_SettlementServiceServicer_to_server,
            service_name=settlement_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
