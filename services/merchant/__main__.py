"""Start merchant-service: ``python -m services.merchant``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2_grpc
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from paymesh.risk.v1 import risk_pb2_grpc
from services.merchant.dashboard import DashboardSources
from services.merchant.servicer import MerchantServicer
from services.merchant.store import MerchantStore
from services.mesh.bootstrap import Registration, ServiceContext, run

NAME = "merchant-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own store and its five dashboard downstreams."""
    store = MerchantStore(context.database_path())
    context.on_stop.append(store.close)
    clients = context.clients
    sources = DashboardSources(
        payments=clients.stub(
            "payment-gateway", payment_gateway_pb2_grpc.PaymentGatewayServiceStub
        ),
        accounting=clients.stub("accounting-service", accounting_pb2_grpc.AccountingServiceStub),
        analytics=clients.stub("analytics-service", analytics_pb2_grpc.AnalyticsServiceStub),
        risk=clients.stub("risk-service", risk_pb2_grpc.RiskServiceStub),
        notifications=clients.stub(
            "notification-service", notification_pb2_grpc.NotificationServiceStub
        ),
    )
    return [
        Registration(
            servicer=MerchantServicer(store, sources, webhook_secrets=sources.notifications),
            add_to_server=merchant_pb2_grpc.add_MerchantServiceServicer_to_server,
            service_name=merchant_pb2.DESCRIPTOR.services_by_name["MerchantService"].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
