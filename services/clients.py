"""The one client factory: every downstream stub and partner client of a service is made here.

Stubs are bound to one shared ``grpc.aio`` channel per target, built with the policy chain's
interceptors and channel options; partner clients are the chain's HTTP wrapper. Both exist
only along edges the topology declares, so a service cannot quietly call something the
topology does not know about, nor call anything outside the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from grpc import aio

from interceptors.chain import ClientChain
from interceptors.http import PartnerClient
from services.topology import Topology, TopologyError

StubT = TypeVar("StubT")

__all__ = ["ClientFactory", "PartnerClient"]


class ClientFactory:
    """Makes stubs and partner clients for one calling service; owns their channels."""

    def __init__(self, *, caller: str, topology: Topology, chain: ClientChain) -> None:
        self._caller = caller
        self._topology = topology
        self._chain = chain
        self._spec = topology.service(caller)
        self._channels: dict[str, aio.Channel] = {}
        self._partners: dict[str, PartnerClient] = {}

    @property
    def caller(self) -> str:
        """Mesh name of the service the clients belong to."""
        return self._caller

    @property
    def chain(self) -> ClientChain:
        """The policy chain every call of this factory passes through."""
        return self._chain

    def channel(self, target: str) -> aio.Channel:
        """The shared channel to ``target``; TopologyError if the edge is not declared."""
        if target not in self._spec.calls:
            raise TopologyError(
                f"{self._caller} -> {target} is not an edge of the topology; "
                f"{self._caller} calls: {', '.join(self._spec.calls) or 'nothing'}"
            )
        channel = self._channels.get(target)
        if channel is None:
            channel = self._chain.aio_channel(target, self._topology.address(target))
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
            client = self._chain.http_client(name, self._topology.partner_url(name))
            self._partners[name] = client
        return client

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
