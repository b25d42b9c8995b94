"""Start channel-adapter: ``python -m services.channel_adapter``."""

from services.channel_adapter.config import AdapterConfig
from services.channel_adapter.servicer import (
    EXCHANGE_RATE,
    PAYMENT_CHANNEL,
    ChannelAdapterServicer,
)
from services.channel_adapter.store import ChargeStore
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.storage.shared_state import SharedCache

NAME = Target.CHANNEL_ADAPTER


def build(context: ServiceContext) -> list[object]:
    """The servicer over the service's own store and its two partners."""
    config = AdapterConfig.from_environ(context.environ)
    store = ChargeStore(context.database_path())
    context.on_stop.append(store.close)
    shared = context.shared_state()
    servicer = ChannelAdapterServicer(
        store,
        channel=context.clients.partner(PAYMENT_CHANNEL),
        rates=context.clients.partner(EXCHANGE_RATE),
        rate_ttl_s=config.rate_ttl_s,
        shared_rates=None if shared is None else SharedCache(shared, NAME, "rates"),
    )
    return [servicer]


if __name__ == "__main__":
    run(NAME, build)
