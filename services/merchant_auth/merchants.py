"""What merchant-service says about a merchant, asked over the edge merchant-auth -> merchant.

The last answer per merchant is remembered (at most MAX_REMEMBERED merchants). A lookup that
allows it answers from that memory while it is younger than ``cache_s`` (authentication does,
so a suspension reaches it within ``cache_s``); others ask merchant-service every time. The
memory also stands in, for up to ``stale_s``, when merchant-service cannot answer (down, out of
deadline, breaker open): authentication keeps working through a short outage, while a
merchant unseen for longer than that fails closed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from interceptors.codes import UNREACHABLE
from interceptors.errors import CallError, NotFoundError, Reason
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from services.mesh.errors import NotFound

#: Codes that say merchant-service is unhealthy, not that the answer is "no".
_OUTAGE_CODES = UNREACHABLE
#: Merchants remembered at most; the least recently asked are forgotten first.
MAX_REMEMBERED = 10_000


class MerchantDirectory:
    """Looks merchants up at merchant-service, with a stale-if-error memory."""

    def __init__(
        self,
        merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
        *,
        stale_s: float,
        cache_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._merchants = merchants
        self._stale_s = stale_s
        # A cached answer is never older than an outage may keep one.
        self._cache_s = min(cache_s, stale_s)
        self._clock = clock
        self._remembered: OrderedDict[str, tuple[float, merchant_pb2.Merchant]] = OrderedDict()

    async def lookup(
        self, merchant_id: str, *, allow_stale: bool, allow_cached: bool = False
    ) -> merchant_pb2.Merchant:
        """The merchant as merchant-service has it now (or had it within ``cache_s``).

        Args:
            merchant_id: Merchant to look up.
            allow_cached: Answer from an answer of merchant-service younger than ``cache_s``
                without asking it again.
            allow_stale: During a merchant-service outage, answer with what it said at most
                ``stale_s`` seconds ago instead of failing.

        Raises:
            NotFound: merchant-service does not know the merchant (MERCHANT_NOT_FOUND).
            CallError: merchant-service failed and no usable memory exists.
        """
        if allow_cached:
            remembered = self._remembered.get(merchant_id)
            if remembered is not None and self._clock() - remembered[0] < self._cache_s:
                return remembered[1]
        try:
            response = await self._merchants.GetMerchant(
                merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
            )
        except NotFoundError as error:
            self._remembered.pop(merchant_id, None)
            raise NotFound(
                f"merchant {merchant_id!r} does not exist",
                reason=Reason.MERCHANT_NOT_FOUND,
                metadata={"merchant_id": merchant_id},
            ) from error
        except CallError as error:
            if allow_stale and error.code().name in _OUTAGE_CODES:
                remembered = self._remembered.get(merchant_id)
                if remembered is not None and self._clock() - remembered[0] <= self._stale_s:
                    return remembered[1]
            raise
        self._remember(response.merchant)
        return response.merchant

    def _remember(self, merchant: merchant_pb2.Merchant) -> None:
        self._remembered[merchant.merchant_id] = (self._clock(), merchant)
        self._remembered.move_to_end(merchant.merchant_id)
        while len(self._remembered) > MAX_REMEMBERED:
            self._remembered.popitem(last=False)
