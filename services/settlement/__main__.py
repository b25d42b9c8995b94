"""Start settlement-service: ``python -m services.settlement``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2_grpc
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.settlement.servicer import SettlementServicer
from services.settlement.store import SettlementStore
from services.storage.resumable import recovery_interval_s

NAME = Target.SETTLEMENT


async def build(context: ServiceContext) -> list[object]:
    """The servicer over its store, the ledger, withdrawals, merchants and notifications;
    starts the recovery loop (every ``SETTLEMENT_SERVICE_RECOVERY_INTERVAL_S``, default 10 s)."""
    interval_s = recovery_interval_s(NAME, context.environ)
    store = SettlementStore(context.database_path())
    servicer = SettlementServicer(
        store,
        ledger=context.clients.stub(Target.ACCOUNTING, accounting_pb2_grpc.AccountingServiceStub),
        withdrawals=context.clients.stub(
            Target.WITHDRAWAL, withdrawal_pb2_grpc.WithdrawalServiceStub
        ),
        merchants=context.clients.stub(Target.MERCHANT, merchant_pb2_grpc.MerchantServiceStub),
        notifications=context.clients.stub(
            Target.NOTIFICATION, notification_pb2_grpc.NotificationServiceStub
        ),
    )
    servicer.start_recovery(interval_s)
    context.on_stop.append(servicer.close)
    context.on_stop.append(store.close)
    return [servicer]


if __name__ == "__main__":
    run(NAME, build)
