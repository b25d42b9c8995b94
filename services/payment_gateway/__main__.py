"""Start payment-gateway: ``python -m services.payment_gateway``."""

import asyncio
import contextlib

from paymesh.payment_gateway.v1 import payment_gateway_pb2, payment_gateway_pb2_grpc
from services.bootstrap import Registration, ServiceContext, run
from services.payment_gateway.config import GatewayConfig
from services.payment_gateway.flow import Downstreams, PaymentFlow
from services.payment_gateway.recovery import Recovery
from services.payment_gateway.servicer import PaymentGatewayServicer
from services.payment_gateway.store import PaymentStore

NAME = "payment-gateway"


async def build(context: ServiceContext) -> list[Registration]:
    """The servicer over the gateway's store, plus the crash recovery loop.

    The first recovery pass starts right away (in the background, so a downstream that is
    not up yet delays nothing); it finishes whatever a killed process left unfinished.
    """
    config = GatewayConfig.from_environ(context.environ)
    store = PaymentStore(context.database_path())
    flow = PaymentFlow(
        store, Downstreams.from_clients(context.clients), charge_cutoff_s=config.charge_cutoff_s
    )
    recovery = Recovery(store, flow)
    loop_task = asyncio.create_task(recovery.run_forever(config.recovery_interval_s))

    async def stop() -> None:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        store.close()

    context.on_stop.append(stop)
    return [
        Registration(
            servicer=PaymentGatewayServicer(store, flow),
            add_to_server=payment_gateway_pb2_grpc.add_PaymentGatewayServiceServicer_to_server,
            service_name=payment_gateway_pb2.DESCRIPTOR.services_by_name[
                "PaymentGatewayService"
            ].full_name,
        )
    ]


if __name__ == "__main__":
    run(NAME, build)
