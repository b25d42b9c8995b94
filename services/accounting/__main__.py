"""Start accounting-service: ``python -m services.accounting``."""

from services.accounting.servicer import AccountingServicer
from services.accounting.store import LedgerStore
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target

NAME = Target.ACCOUNTING


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own ledger."""
    store = LedgerStore(context.database_path())
    context.on_stop.append(store.close)
    return [AccountingServicer(store)]


if __name__ == "__main__":
    run(NAME, build)
