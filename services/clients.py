"""The one client factory: every downstream stub and partner client of a service is made here.

Stubs are bound to one shared ``grpc.aio`` channel per target, built with the policy chain's
interceptors and channel options, and only along edges the topology declares, so a service
cannot quietly call something the topology does not know about.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from grpc import aio

from services.topology import Topology, TopologyError

StubT = TypeVar("StubT")


class ClientFactory:
    """Makes stubs for one calling service; owns their channels."""

    def __init__(self, *, caller: str, topology: Topology) -> None:
        self._caller = caller
        self._topology = topology
        self._spec = topology.service(caller)
        self._channels: dict[str, aio.Channel] = {}

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

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
