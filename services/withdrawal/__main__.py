"""Start withdrawal-service: ``python -m services.withdrawal``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2, withdrawal_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.withdrawal.servicer import WithdrawalServicer
from services.withdrawal.store import WithdrawalStore

NAME = "withdrawal-service"


async def build(context: ServiceContext) -> list[Registration]:
    """The servicer over its store, the ledger, notifications and the bank; starts recovery."""
    store = WithdrawalStore(context.database_path())
    servicer = WithdrawalServicer(
        store,
        ledger=context.clients.stub(
            "accounting-service", accounting_pb2_grpc.AccountingServiceStub
        ),
        notifications=context.clients.stub(
            "notification-service", notification_pb2_grpc.NotificationServiceStub
        ),
        bank=context.clients.partner("bank-transfer"),
    )
    servicer.start_recovery()
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
