"""The merchant money is moved for must exist and be active: asked of merchant-service first.

settlement-service and withdrawal-service check a new request's merchant before anything is
written, so an unknown merchant is NOT_FOUND (MERCHANT_NOT_FOUND), a suspended one is
FAILED_PRECONDITION (MERCHANT_INACTIVE), and an unreachable merchant-service is UNAVAILABLE
with a retry delay, the request id left free for the retry.
"""

from __future__ import annotations

from interceptors.errors import CallError, NotFoundError, Reason
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from services.mesh.downstream import is_ambiguous
from services.mesh.errors import FailedPrecondition, NotFound, Unavailable
from services.mesh.topology import Target

#: RetryInfo of a refusal because merchant-service could not answer.
RETRY_DELAY_S = 1.0


async def require_active_merchant(
    merchants: merchant_pb2_grpc.MerchantServiceAsyncStub, merchant_id: str, *, action: str
) -> merchant_pb2.Merchant:
    """The merchant, if it exists and is active.

    Args:
        action: what is refused, for the message (``"settled"``, ``"paid out"``).

    Raises:
        NotFound: MERCHANT_NOT_FOUND.
        FailedPrecondition: MERCHANT_INACTIVE, the merchant is suspended.
        Unavailable: merchant-service did not answer (CIRCUIT_OPEN if its breaker is open,
            else DOWNSTREAM_UNAVAILABLE), with a retry delay.
    """
    metadata = {"merchant_id": merchant_id}
    try:
        reply = await merchants.GetMerchant(
            merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
        )
    except NotFoundError:
        raise NotFound(
            f"merchant {merchant_id!r} does not exist",
            reason=Reason.MERCHANT_NOT_FOUND,
            metadata=metadata,
        ) from None
    except CallError as exc:
        if not is_ambiguous(exc):
            raise
        breaker_open = exc.stop_reason == "breaker_open"
        raise Unavailable(
            f"merchant-service cannot confirm merchant {merchant_id!r} now: {exc.details()}",
            reason=Reason.CIRCUIT_OPEN if breaker_open else Reason.DOWNSTREAM_UNAVAILABLE,
            metadata={**metadata, "target": Target.MERCHANT},
            retry_delay_s=RETRY_DELAY_S,
            pushback_ms=-1,
        ) from exc
    merchant = reply.merchant
    if merchant.status != merchant_pb2.MERCHANT_STATUS_ACTIVE:
        raise FailedPrecondition(
            f"merchant {merchant_id!r} is suspended and cannot be {action}",
            reason=Reason.MERCHANT_INACTIVE,
            metadata=metadata,
        )
    return merchant
