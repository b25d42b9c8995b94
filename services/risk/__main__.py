"""Start risk-service: ``python -m services.risk``."""

from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.risk.geo import GEO_IP, GeoLookup
from services.risk.servicer import RiskServicer
from services.risk.store import AssessmentStore
from services.storage.shared_state import SharedCache

NAME = Target.RISK


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own store and the geo-IP partner."""
    store = AssessmentStore(context.database_path())
    context.on_stop.append(store.close)
    shared = context.shared_state()
    geo = GeoLookup(
        context.clients.partner(GEO_IP),
        shared=None if shared is None else SharedCache(shared, NAME, "geo-ip"),
    )
    return [RiskServicer(store, geo)]


if __name__ == "__main__":
    run(NAME, build)
