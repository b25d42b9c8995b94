"""Start analytics-service: ``python -m services.analytics``."""

from paymesh.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics.servicer import AnalyticsServicer
from services.analytics.store import EventStore
from services.mesh.bootstrap import Registration, ServiceContext, run

NAME = "analytics-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own event store."""
    store = EventStore(context.database_path())
    context.on_stop.append(store.close)
    return [
        Registration(
            servicer=AnalyticsServicer(store),
            add_to_server=analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server,
            service_name=analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
