"""Start accounting-service: ``python -m services.accounting``."""

from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc
from services.accounting.servicer import AccountingServicer
from services.accounting.store import LedgerStore
from services.mesh.bootstrap import Registration, ServiceContext, run

NAME = "accounting-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own ledger."""
    store = LedgerStore(context.database_path())
    context.on_stop.append(store.close)
    return [
        Registration(
            servicer=AccountingServicer(store),
            add_to_server=accounting_pb2_grpc.add_AccountingServiceServicer_to_server,
            service_name=accounting_pb2.DESCRIPTOR.services_by_name["AccountingService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
