"""The one client factory: every downstream stub and partner client of a service is made here.

Stubs are bound to one shared ``grpc.aio`` channel per target, built with the policy chain's
interceptors and channel options, and only along edges the topology declares, so a service
cannot quietly call something the topology does not know about.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from grpc import aio

from services.topology import Topology, TopologyError

StubT = TypeVar("StubT")
DEFAULT_PARTNER_TIMEOUT_S = 5.0


class PartnerError(RuntimeError):
    """An HTTP partner could not be reached or answered with an outage (5xx)."""

    def __init__(self, partner: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{partner}: {message}")
        self.partner = partner
        self.status = status


@dataclass(frozen=True, slots=True)
class PartnerResponse:
    """A partner's answer: HTTP status and the decoded JSON body."""

    status: int
    """HTTP status code (2xx and 4xx; 5xx and transport failures raise PartnerError)."""
    body: Any
    """Decoded JSON body (``None`` when empty)."""


class PartnerClient:
    """Calls one HTTP partner with JSON bodies and an optional Idempotency-Key header."""

    def __init__(self, name: str, base_url: str) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> PartnerResponse:
        """Send one request; PartnerError on a transport failure or a 5xx answer."""
        url = f"{self.base_url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = jsonlib.dumps(json).encode() if json is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        timeout = timeout_s or DEFAULT_PARTNER_TIMEOUT_S
        return await asyncio.to_thread(self._send, req, timeout)

    def _send(self, req: urllib.request.Request, timeout: float) -> PartnerResponse:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                raw = reply.read()
                status = reply.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise PartnerError(self.name, f"unreachable: {exc}") from exc
        if status >= 500:
            raise PartnerError(self.name, f"answered HTTP {status}", status=status)
        try:
            body = jsonlib.loads(raw) if raw else None
        except ValueError as exc:
            raise PartnerError(self.name, f"sent a body that is not JSON (HTTP {status})") from exc
        return PartnerResponse(status=status, body=body)


class ClientFactory:
    """Makes stubs for one calling service; owns their channels."""

    def __init__(self, *, caller: str, topology: Topology) -> None:
        self._caller = caller
        self._topology = topology
        self._spec = topology.service(caller)
        self._channels: dict[str, aio.Channel] = {}
        self._partners: dict[str, PartnerClient] = {}

    @property
    def caller(self) -> str:
        """Mesh name of the service the clients belong to."""
        return self._caller

    def channel(self, target: str) -> aio.Channel:
        """The shared channel to ``target``; TopologyError if the edge is not declared."""
        if target not in self._spec.calls:
            raise TopologyError(
                f"{self._caller} -> {target} is not an edge of the topology; "
                f"{self._caller} calls: {', '.join(self._spec.calls) or 'nothing'}"
            )
        channel = self._channels.get(target)
        if channel is None:
            channel = aio.insecure_channel(self._topology.address(target))
            self._channels[target] = channel
        return channel

    def stub(self, target: str, stub_type: Callable[[aio.Channel], StubT]) -> StubT:
        """A generated stub of ``stub_type`` bound to ``target``'s channel."""
        return stub_type(self.channel(target))

    def partner(self, name: str) -> PartnerClient:
        """The client of HTTP partner ``name``; TopologyError if the edge is not declared."""
        if name not in self._spec.partners:
            raise TopologyError(
                f"{self._caller} -> {name} is not a partner edge of the topology; "
                f"{self._caller} calls partners: {', '.join(self._spec.partners) or 'none'}"
            )
        client = self._partners.get(name)
        if client is None:
            client = PartnerClient(name, self._topology.partner_url(name))
            self._partners[name] = client
        return client

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
