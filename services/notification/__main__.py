"""Start notification-service: ``python -m services.notification``."""

from paymesh.notification.v1 import notification_pb2, notification_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.notification import delivery
from services.notification.config import NotificationConfig
from services.notification.delivery import DestinationPolicy
from services.notification.secret_store import SecretSealer, WebhookSecretStore
from services.notification.servicer import MERCHANT_WEBHOOKS, NotificationServicer
from services.notification.store import NotificationStore

NAME = "notification-service"


def build(
    context: ServiceContext, *, resolver: delivery.Resolver = delivery.system_resolver
) -> list[Registration]:
    """The servicer over the service's own store, its sealed secrets and the webhook client.

    ``resolver`` answers DNS for webhook hosts (tests give fixed answers).
    """
    config = NotificationConfig.from_environ(context.environ, context.var_dir)
    store = NotificationStore(context.database_path())
    context.on_stop.append(store.close)
    secrets = WebhookSecretStore(context.database_path(), SecretSealer(config.sealing_key()))
    context.on_stop.append(secrets.close)
    servicer = NotificationServicer(
        store,
        secrets,
        context.clients.partner(MERCHANT_WEBHOOKS),
        policy=DestinationPolicy(production=config.production),
        resolver=resolver,
    )
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
