"""Start notification-service: ``python -m services.notification``."""

from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.notification.servicer import MERCHANT_WEBHOOKS, NotificationServicer
from services.notification.store import NotificationStore

NAME = "notification-service"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own store and the merchant-webhooks partner."""
    store = NotificationStore(context.database_path())
    context.on_stop.append(store.close)
    servicer = NotificationServicer(store, context.clients.partner(MERCHANT_WEBHOOKS))
    return [
        Registration(
            servicer=servicer,
            add_to_server=notification_pb2_grpc.add_NotificationServiceServicer_to_server,
            service_name=notification_pb2.DESCRIPTOR.services_by_name[
                "NotificationService"
            ].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
