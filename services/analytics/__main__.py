"""Start analytics-service: ``python -m services.analytics``."""

from services.analytics.servicer import AnalyticsServicer
from services.analytics.store import EventStore
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target

NAME = Target.ANALYTICS


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own event store."""
    store = EventStore(context.database_path())
    context.on_stop.append(store.close)
    return [AnalyticsServicer(store)]


if __name__ == "__main__":
    run(NAME, build)
