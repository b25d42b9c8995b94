"""Start merchant-service: ``python -m services.merchant``."""

from paymesh.accounting.v1 import accounting_pb2_grpc
from paymesh.analytics.v1 import analytics_pb2_grpc
from paymesh.notification.v1 import notification_pb2_grpc
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc
from paymesh.risk.v1 import risk_pb2_grpc
from services.merchant.dashboard import DashboardSources
from services.merchant.servicer import MerchantServicer
from services.merchant.store import MerchantStore
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target

NAME = Target.MERCHANT


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own store and its five dashboard downstreams."""
    store = MerchantStore(context.database_path())
    context.on_stop.append(store.close)
    clients = context.clients
    sources = DashboardSources(
        payments=clients.stub(
            Target.PAYMENT_GATEWAY, payment_gateway_pb2_grpc.PaymentGatewayServiceStub
        ),
        accounting=clients.stub(Target.ACCOUNTING, accounting_pb2_grpc.AccountingServiceStub),
        analytics=clients.stub(Target.ANALYTICS, analytics_pb2_grpc.AnalyticsServiceStub),
        risk=clients.stub(Target.RISK, risk_pb2_grpc.RiskServiceStub),
        notifications=clients.stub(
            Target.NOTIFICATION, notification_pb2_grpc.NotificationServiceStub
        ),
    )
    return [MerchantServicer(store, sources, webhook_secrets=sources.notifications)]


if __name__ == "__main__":
    run(NAME, build)
