"""Start order-service: ``python -m services.order``."""

from paymesh.order.v1 import order_pb2, order_pb2_grpc
from services.mesh.bootstrap import Registration, ServiceContext, run
from services.order.servicer import OrderServicer
from services.order.store import OrderStore

NAME = "order-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own store."""
    store = OrderStore(context.database_path())
    context.on_stop.append(store.close)
    return [
        Registration(
            servicer=OrderServicer(store),
            add_to_server=order_pb2_grpc.add_OrderServiceServicer_to_server,
            service_name=order_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
