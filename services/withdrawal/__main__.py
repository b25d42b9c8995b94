"""Start withdrawal-service: ``python -m services.withdrawal``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Partner, Target
from services.storage.resumable import recovery_interval_s
from services.withdrawal.servicer import WithdrawalServicer
from services.withdrawal.store import WithdrawalStore

NAME = Target.WITHDRAWAL


async def build(context: ServiceContext) -> list[object]:
    """The servicer over its store, the ledger, notifications, merchants and the bank; starts
    the recovery loop (every ``WITHDRAWAL_SERVICE_RECOVERY_INTERVAL_S``, default 10 s)."""
    interval_s = recovery_interval_s(NAME, context.environ)
    store = WithdrawalStore(context.database_path())
    servicer = WithdrawalServicer(
        store,
        ledger=context.clients.stub(Target.ACCOUNTING, accounting_pb2_grpc.AccountingServiceStub),
        notifications=context.clients.stub(
            Target.NOTIFICATION, notification_pb2_grpc.NotificationServiceStub
        ),
        merchants=context.clients.stub(Target.MERCHANT, merchant_pb2_grpc.MerchantServiceStub),
        bank=context.clients.partner(Partner.BANK_TRANSFER),
    )
    servicer.start_recovery(interval_s)
    context.on_stop.append(servicer.close)
    context.on_stop.append(store.close)
    return [servicer]


if __name__ == "__main__":
    run(NAME, build)
