"""Start risk-service: ``python -m services.risk``."""

from paymesh.risk.v1 import risk_pb2, risk_pb2_grpc
from services.mesh.bootstrap import Registration, ServiceContext, run
from services.risk.geo import GEO_IP, GeoLookup
from services.risk.servicer import RiskServicer
from services.risk.store import AssessmentStore

NAME = "risk-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own store and the geo-IP partner."""
    store = AssessmentStore(context.database_path())
    context.on_stop.append(store.close)
    geo = GeoLookup(context.clients.partner(GEO_IP))
    return [
        Registration(
            servicer=RiskServicer(store, geo),
            add_to_server=risk_pb2_grpc.add_RiskServiceServicer_to_server,
            service_name=risk_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
