"""Start withdrawal-service: ``python -m services.withdrawal``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.mesh.bootstrap import Registration, ServiceContext, run
from services.storage.resumable import recovery_interval_s
from services.withdrawal.servicer import WithdrawalServicer
from services.withdrawal.store import WithdrawalStore

NAME = "withdrawal-service"


async def build(context: ServiceContext) -> list[Registration]:
    """The servicer over its store, the ledger, notifications, merchants and the bank; starts
    the recovery loop (every ``WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S``, default 10 s)."""
    interval_s = recovery_interval_s(NAME, context.environ)
    store = WithdrawalStore(context.database_path())
    servicer = WithdrawalServicer(
        store,
        ledger=context.clients.stub(
            "accounting-service", accounting_pb2_grpc.AccountingServiceStub
        ),
        notifications=context.clients.stub(
            "notification-service", notification_pb2_grpc.NotificationServiceStub
        ),
        merchants=context.clients.stub("merchant-service", merchant_pb2_grpc.MerchantServiceStub),
        bank=context.clients.partner("bank-transfer"),
    )
    servicer.start_recovery(interval_s)
    context.on_stop.append(servicer.close)
    context.on_stop.append(store.close)
    return [
        Registration(
            servicer=servicer,
            add_to_server=withdrawal_pb2_grpc.add_WithdrawalServiceServicer_to_server,
            service_name=withdrawal_pb2.DESCRIPTOR.services_by_name["WithdrawalService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
