"""Start order-service: ``python -m services.order``."""

from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.order.servicer import OrderServicer
from services.order.store import OrderStore

NAME = Target.ORDER


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own store."""
    store = OrderStore(context.database_path())
    context.on_stop.append(store.close)
    return [OrderServicer(store)]


if __name__ == "__main__":
    run(NAME, build)
