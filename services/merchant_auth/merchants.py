"""What merchant-service says about a merchant, asked over the edge merchant-auth -> merchant.

The last answer per merchant is remembered (at most MAX_REMEMBERED merchants). A lookup that
allows it answers from that memory while it is younger than ``cache_s`` (authentication does,
so a suspension reaches it within ``cache_s``); others ask merchant-service every time. The
memory also stands in, for up to ``stale_s``, when merchant-service cannot answer (down, out of
deadline, breaker open): authentication keeps working through a short outage, while a
merchant unseen for longer than that fails closed. With ``REDIS_URL`` the replicas share
that memory: an answer one replica got serves the others under the same two bounds.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Callable

from interceptors.codes import UNREACHABLE
from interceptors.errors import CallError, NotFoundError, Reason
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from services.mesh.errors import NotFound
from services.storage.shared_state import SharedCache

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
        shared: SharedCache | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._merchants = merchants
        self._shared = shared
        self._wall_clock = wall_clock
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
            shared = await self._shared_answer(merchant_id, self._cache_s)
            if shared is not None:
                return shared
        try:
            response = await self._merchants.GetMerchant(
                merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
            )
        except NotFoundError as error:
            self._remembered.pop(merchant_id, None)
            if self._shared is not None:
                await self._shared.drop(merchant_id)
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
                shared = await self._shared_answer(merchant_id, self._stale_s, inclusive=True)
                if shared is not None:
                    return shared
            raise
        self._remember(response.merchant)
        if self._shared is not None and self._stale_s > 0:
            # Kept as long as it may stand in for an outage; fresh for cache_s of that.
            record = {
                "merchant": base64.b64encode(response.merchant.SerializeToString()).decode(),
                "answered_s": self._wall_clock(),
            }
            await self._shared.put(merchant_id, record, ttl_s=self._stale_s)
        return response.merchant

    async def _shared_answer(
        self, merchant_id: str, max_age_s: float, *, inclusive: bool = False
    ) -> merchant_pb2.Merchant | None:
        """What merchant-service told any replica at most ``max_age_s`` ago, if Redis has it."""
        if self._shared is None:
            return None
        found = await self._shared.get(merchant_id)
        if found is None:
            return None
        record = found[0]
        answered, encoded = record.get("answered_s"), record.get("merchant")
        if not isinstance(answered, int | float) or not isinstance(encoded, str):
            return None
        age = self._wall_clock() - answered
        if not (age <= max_age_s if inclusive else age < max_age_s):
            return None
        try:
            merchant = merchant_pb2.Merchant.FromString(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            return None  # protobuf's DecodeError is a ValueError too
        return merchant if merchant.merchant_id == merchant_id else None

    def _remember(self, merchant: merchant_pb2.Merchant) -> None:
        self._remembered[merchant.merchant_id] = (self._clock(), merchant)
        self._remembered.move_to_end(merchant.merchant_id)
        while len(self._remembered) > MAX_REMEMBERED:
            self._remembered.popitem(last=False)
