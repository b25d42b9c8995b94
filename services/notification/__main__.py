"""Start notification-service: ``python -m services.notification``."""

import random
import time
from collections.abc import Callable

from paymesh.merchant.v1 import merchant_pb2_grpc
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.notification import delivery
from services.notification.config import NotificationConfig
from services.notification.delivery import DestinationPolicy
from services.notification.dispatch import Dispatcher
from services.notification.schedule import Random
from services.notification.secret_store import SecretSealer, WebhookSecretStore
from services.notification.servicer import MERCHANT_WEBHOOKS, NotificationServicer
from services.notification.store import NotificationStore
from services.notification.webhooks import WebhookSender

NAME = Target.NOTIFICATION


def build(
    context: ServiceContext,
    *,
    resolver: delivery.Resolver = delivery.system_resolver,
    clock: Callable[[], float] = time.time,
    rng: Random = random.random,
) -> list[object]:
    """The servicer over the service's own store, its sealed secrets and the webhook client,
    and the delivery loop that retries failed webhooks (stopped with the service).

    ``resolver`` answers DNS for webhook hosts, ``clock`` and ``rng`` drive the retry
    schedule (tests give fixed ones).
    """
    config = NotificationConfig.from_environ(context.environ, context.var_dir)
    policy = DestinationPolicy(production=config.production)
    store = NotificationStore(context.database_path(), clock=clock)
    context.on_stop.append(store.close)
    secrets = WebhookSecretStore(context.database_path(), SecretSealer(config.sealing_key()))
    context.on_stop.append(secrets.close)
    client = delivery.DeliveryClient(config.pools)
    context.on_stop.append(client.close)  # after the dispatcher, which is stopped first
    sender = WebhookSender(
        secrets,
        context.clients.partner(MERCHANT_WEBHOOKS),
        policy=policy,
        resolver=resolver,
        client=client,
        clock=clock,
    )
    dispatcher = Dispatcher(
        store,
        sender,
        context.clients.stub(Target.MERCHANT, merchant_pb2_grpc.MerchantServiceStub),
        policy=policy,
        schedule=config.schedule,
        settings=config.loop,
        clock=clock,
        rng=rng,
    )
    dispatcher.start()
    # Stopped before the stores close (callbacks run in order).
    context.on_stop.insert(0, dispatcher.close)
    servicer = NotificationServicer(store, secrets, dispatcher, policy=policy)
    return [servicer]


if __name__ == "__main__":
    run(NAME, build)
