"""Start channel-adapter: ``python -m services.channel_adapter``."""

from paymesh.channel_adapter.v1 import channel_adapter_pb2, channel_adapter_pb2_grpc
from services.channel_adapter.config import AdapterConfig
from services.channel_adapter.servicer import (
    EXCHANGE_RATE,
    PAYMENT_CHANNEL,
    ChannelAdapterServicer,
)
from services.channel_adapter.store import ChargeStore
from services.mesh.bootstrap import Registration, ServiceContext, run

NAME = "channel-adapter"


def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the service's own store and its two partners."""
    config = AdapterConfig.from_environ(context.environ)
    store = ChargeStore(context.database_path())
    context.on_stop.append(store.close)
    servicer = ChannelAdapterServicer(
        store,
        channel=context.clients.partner(PAYMENT_CHANNEL),
        rates=context.clients.partner(EXCHANGE_RATE),
        rate_ttl_s=config.rate_ttl_s,
    )
    return [
        Registration(
            servicer=servicer,
            add_to_server=channel_adapter_pb2_grpc.add_ChannelAdapterServiceServicer_to_server,
            service_name=channel_adapter_pb2.DESCRIPTOR.services_by_name[
                "ChannelAdapterService"
            ].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
