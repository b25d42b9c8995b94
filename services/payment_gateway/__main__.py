"""Start payment-gateway: ``python -m services.payment_gateway``."""

import asyncio
import contextlib
from pathlib import Path

from paymesh.payment_gateway.v1 import payment_gateway_pb2
from services.mesh.admin import AdminRequest, AdminResponse
from services.mesh.bootstrap import ServiceContext, run
from services.mesh.topology import Target
from services.payment_gateway.config import GatewayConfig
from services.payment_gateway.dependencies import (
    CREATE_PAYMENT_NEEDS,
    REFUND_PAYMENT_NEEDS,
    DependencyWatch,
)
from services.payment_gateway.flow import HOLD_FILE_VAR, Downstreams, PaymentFlow
from services.payment_gateway.outbox import OutboxRelay
from services.payment_gateway.recovery import Recovery
from services.payment_gateway.servicer import PaymentGatewayServicer
from services.payment_gateway.store import PaymentStore

NAME = Target.PAYMENT_GATEWAY
SERVICE = payment_gateway_pb2.DESCRIPTOR.services_by_name["PaymentGatewayService"].full_name
CREATE_PAYMENT = f"/{SERVICE}/CreatePayment"
REFUND_PAYMENT = f"/{SERVICE}/RefundPayment"


async def build(context: ServiceContext) -> list[object]:
    """The servicer over the gateway's store, the outbox relay and the recovery loop.

    Relay and recovery start right away, in the background: a downstream that is not up yet
    delays nothing, and each waits for it with backoff. CreatePayment and RefundPayment get a
    precheck that refuses them before the gate while a dependency's breaker is open.
    ``GET /outbox`` on the admin port shows what still waits for delivery.
    """
    config = GatewayConfig.from_environ(context.environ)
    store = PaymentStore(context.database_path())
    downstreams = Downstreams.from_clients(context.clients)
    watch = DependencyWatch(context.clients.chain.breakers)
    relay = OutboxRelay(
        store.outbox,
        downstreams.outbox_routes(),
        policy=config.relay_policy(),
        leases=store.leases,
    )
    flow = PaymentFlow(
        store,
        downstreams,
        charge_cutoff_s=config.charge_cutoff_s,
        on_outbox=relay.kick,
        watch=watch,
        hold_file=Path(held) if (held := context.environ.get(HOLD_FILE_VAR)) else None,
    )
    recovery = Recovery(store, flow, schedule=config.recovery_schedule(), watch=watch)
    relay_task = asyncio.create_task(relay.run_forever(), name="outbox-relay")
    recovery.start()

    def refuse_payment() -> None:
        watch.refuse_if_down(CREATE_PAYMENT_NEEDS, action="CreatePayment")

    def refuse_refund() -> None:
        watch.refuse_if_down(REFUND_PAYMENT_NEEDS, action="RefundPayment")

    context.prechecks[CREATE_PAYMENT] = refuse_payment
    context.prechecks[REFUND_PAYMENT] = refuse_refund

    def outbox(request: AdminRequest) -> AdminResponse:
        return AdminResponse.of_json(store.outbox.summary())

    context.admin.route("GET", "/outbox", outbox)

    async def stop() -> None:
        relay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay_task
        await recovery.close()
        await flow.close()
        store.close()

    context.on_stop.append(stop)
    return [PaymentGatewayServicer(store, flow, pending_retry_s=config.recovery_interval_s)]


if __name__ == "__main__":
    run(NAME, build)
