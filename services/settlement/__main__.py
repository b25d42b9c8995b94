"""Start settlement-service: ``python -m services.settlement``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from paymesh.withdrawal.v1 import withdrawal_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.settlement.servicer import SettlementServicer
from services.settlement.store import SettlementStore

NAME = "settlement-service"


async def build(context: ServiceContext) -> list[Registration]:
    """The servicer over its store, the ledger and withdrawal-service; starts recovery."""
    store = SettlementStore(context.database_path())
    servicer = SettlementServicer(
        store,
        ledger=context.clients.stub(
            "accounting-service", accounting_pb2_grpc.AccountingServiceStub
        ),
        withdrawals=context.clients.stub(
            "withdrawal-service", withdrawal_pb2_grpc.WithdrawalServiceStub
        ),
    )
    servicer.start_recovery()
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
