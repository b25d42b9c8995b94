"""geo-IP lookups through the partner client, with a small in-process TTL cache.

An address's country changes rarely, and payments from one customer come in bursts, so a
few minutes of caching saves most lookups. A failed lookup is not cached. With ``REDIS_URL``
the replicas share their answers (an entry keeps the TTL it was given when looked up).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from interceptors.http import PartnerClient
from services.mesh.errors import Unavailable
from services.mesh.partner import call_partner
from services.mesh.topology import Partner
from services.risk.rules import Geo
from services.storage.shared_state import SharedCache

GEO_IP = Partner.GEO_IP


class GeoLookup:
    """Looks addresses up at the geo-IP partner; remembers up to ``max_entries`` answers."""

    def __init__(
        self,
        client: PartnerClient,
        *,
        ttl_s: float = 300.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCache | None = None,
    ) -> None:
        self._client = client
        self._shared = shared
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Geo, float]] = OrderedDict()

    async def lookup(self, ip: str) -> Geo:
        """What the partner says of ``ip``; ``Geo(looked_up=False)`` when it cannot say."""
        cached = self._cache.get(ip)
        if cached is not None and self._clock() < cached[1]:
            self._cache.move_to_end(ip)
            return cached[0]
        if self._shared is not None:
            found = await self._shared.get(ip)
            if found is not None:
                geo = _geo_of(found[0])
                self._remember(ip, geo, found[1])
                return geo
        try:
            status, body = await call_partner(self._client, "GET", "/lookup", query={"ip": ip})
        except Unavailable:
            return Geo(looked_up=False)
        if status != 200 or not isinstance(body, dict):
            return Geo(looked_up=False)
        geo = _geo_of(body)
        self._remember(ip, geo, self._ttl_s)
        if self._shared is not None:
            record = {
                "country": geo.country,
                "proxy": geo.proxy,
                "high_risk": geo.high_risk,
                "city": geo.city,
            }
            await self._shared.put(ip, record, ttl_s=self._ttl_s)
        return geo

    def _remember(self, ip: str, geo: Geo, ttl_s: float) -> None:
        self._cache[ip] = (geo, self._clock() + ttl_s)
        self._cache.move_to_end(ip)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


def _geo_of(body: dict[str, object]) -> Geo:
    """The partner's answer (or the shared cache's copy of one) as a looked-up Geo."""
    return Geo(
        looked_up=True,
        country=str(body.get("country") or "").upper(),
        proxy=bool(body.get("proxy")),
        high_risk=bool(body.get("high_risk")),
        city=str(body.get("city") or ""),
    )
