"""The one client factory: every downstream stub and partner client of a service is made here.

Stubs are bound to one shared ``grpc.aio`` channel per target, built with the policy chain's
interceptors and channel options and the service's mTLS identity; partner clients are the
chain's HTTP adapter (one aiohttp connection pool each, closed with the factory). Targets are
the topology's constants (``Target.ORDER``, ``Partner.GEO_IP``), never strings; both exist
only along edges the topology declares, so a service cannot quietly call something the
topology does not know about, nor call anything outside the chain.
When the identity's certificate is rotated, :meth:`ClientFactory.rotate_if_changed` rebuilds
every channel; stubs made earlier follow, because they are bound to a :class:`RotatingChannel`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from grpc import aio

from interceptors.aio import ForwardingChannel
from interceptors.chain import ClientChain
from interceptors.http import PartnerClient
from services.mesh.tls import TransportSecurity
from services.mesh.topology import Partner, Target, Topology, TopologyError

log = logging.getLogger("paymesh.clients")
#: Time calls in flight on a replaced channel get before it is closed.
ROTATION_GRACE_S = 30.0

StubT = TypeVar("StubT")

__all__ = ["ClientFactory", "PartnerClient"]


class ClientFactory:
    """Makes stubs and partner clients for one calling service; owns their channels."""

    def __init__(
        self,
        *,
        caller: str,
        topology: Topology,
        chain: ClientChain,
        security: TransportSecurity | None = None,
    ) -> None:
        self._caller = caller
        self._topology = topology
        self._chain = chain
        self._security = security or TransportSecurity(name=caller, files=None)
        self._fingerprint = self._security.fingerprint()
        self._spec = topology.service(caller)
        self._channels: dict[str, RotatingChannel] = {}
        self._partners: dict[str, PartnerClient] = {}
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def caller(self) -> str:
        """Mesh name of the service the clients belong to."""
        return self._caller

    @property
    def chain(self) -> ClientChain:
        """The policy chain every call of this factory passes through."""
        return self._chain

    def channel(self, target: Target) -> aio.Channel:
        """The shared channel to ``target``; TopologyError if the edge is not declared."""
        if target not in self._spec.calls:
            raise TopologyError(
                f"{self._caller} -> {target} is not an edge of the topology; "
                f"{self._caller} calls: {', '.join(self._spec.calls) or 'nothing'}"
            )
        channel = self._channels.get(target)
        if channel is None:
            channel = RotatingChannel(lambda: self._open(target))
            self._channels[target] = channel
        return channel

    def channel_options(self, target: Target) -> list[tuple[str, Any]]:
        """Every channel argument of the channel to ``target`` (for a bare channel alike)."""
        return self._chain.aio_channel_options(
            target,
            extra_options=self._security.channel_options(target),
            health_service=self._health_service(target),
        )

    def _health_service(self, target: str) -> str:
        return self._topology.service(target).proto_services[0]

    def _open(self, target: str) -> aio.Channel:
        security = self._security
        # One target for every replica; TLS checks each one's certificate by the mesh name.
        return self._chain.aio_channel(
            target,
            self._topology.dial(target).target,
            credentials=None if security.plaintext else security.channel_credentials(),
            extra_options=security.channel_options(target),
            health_service=self._health_service(target),
        )

    def rotate_if_changed(self) -> bool:
        """Rebuild every channel when the identity's files changed; True if it did."""
        current = self._security.fingerprint()
        if current == self._fingerprint:
            return False
        try:
            self._security.check()
        except ValueError as exc:  # a rotation half written, or a broken one: keep the old
            log.warning("not rotating client channels yet: %s", exc)
            return False
        self._fingerprint = current
        for channel in self._channels.values():
            old = channel.replace()
            task = asyncio.get_running_loop().create_task(old.close(grace=ROTATION_GRACE_S))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        log.info("client channels rebuilt with the rotated identity of %s", self._caller)
        return True

    def stub(self, target: Target, stub_type: Callable[[aio.Channel], StubT]) -> StubT:
        """A generated stub of ``stub_type`` bound to ``target``'s channel."""
        return stub_type(self.channel(target))

    def partner(self, name: Partner) -> PartnerClient:
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
        """Close every channel and partner connection pool; calls in flight are cancelled."""
        channels, self._channels = self._channels, {}
        partners, self._partners = self._partners, {}
        for task in list(self._retired):
            task.cancel()
        for channel in channels.values():
            await channel.close()
        for client in partners.values():
            await client.aclose()


class RotatingChannel(ForwardingChannel):
    """An aio channel whose underlying channel can be replaced under stubs bound to it.

    A stub asks its channel for one multicallable per method at construction; here each
    multicallable looks up the current channel's own on every call (one comparison), so a
    replaced channel takes effect for every stub at its next call.
    """

    def __init__(self, open_channel: Callable[[], aio.Channel]) -> None:
        self._open = open_channel
        self._current = open_channel()
        self.generation = 0

    @property
    def current(self) -> aio.Channel:
        """The channel calls go to now."""
        return self._current

    def replace(self) -> aio.Channel:
        """Open a new channel for new calls; returns the old one for the caller to close."""
        old, self._current = self._current, self._open()
        self.generation += 1
        return old

    def _multicallable(self, kind: str, method: str, kwargs: dict[str, Any]) -> Any:
        return _RotatingCallable(self, kind, method, kwargs)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_unary", method, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("unary_stream", method, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_unary", method, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._multicallable("stream_stream", method, kwargs)


class _RotatingCallable:
    """A multicallable of a :class:`RotatingChannel`, rebuilt after each replacement."""

    __slots__ = ("_callable", "_channel", "_generation", "_kind", "_kwargs", "_method")

    def __init__(
        self, channel: RotatingChannel, kind: str, method: str, kwargs: dict[str, Any]
    ) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._kwargs = kwargs
        self._generation = -1
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._channel
        if self._generation != channel.generation:
            self._callable = getattr(channel.current, self._kind)(self._method, **self._kwargs)
            self._generation = channel.generation
        return self._callable(*args, **kwargs)
