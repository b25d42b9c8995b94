"""How many processes each service runs locally, and where replica k of a service listens.

``--replicas payment-gateway=2,order-service=2`` (or ``PAYMESH_REPLICAS``) asks the launcher for
two of each. Replica 0 keeps the service's addresses; replica k listens on each of them (mesh,
admin, public) shifted by ``k`` times the topology's replica port step
(:func:`services.mesh.topology.replica_port_step`). Every caller gets the list of all of them as
the service's ``*_ADDR``; each replica gets its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.topology import SERVICES, Topology, parse_hostport

REPLICAS_VAR = "PAYMESH_REPLICAS"
#: More than this many processes of one service on one machine is a typo, not a test.
MAX_REPLICAS = 9
#: Separates a service from its replica number in a member's name (``payment-gateway#1``).
REPLICA_MARK = "#"


class ReplicasError(ValueError):
    """``--replicas`` or its variables are invalid; the message names the value."""


def parse_replicas(text: str, *, source: str = REPLICAS_VAR) -> dict[str, int]:
    """``name=count,name=count`` as a mapping; ReplicasError naming ``source`` if invalid."""
    known = {s.name for s in SERVICES}
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, raw = part.partition("=")
        name = name.strip()
        if not equals or name not in known:
            raise ReplicasError(
                f"{source}={text!r}: {part!r} is not <service>=<count> of a mesh service "
                f"(example: payment-gateway=2,order-service=2)"
            )
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_REPLICAS:
            raise ReplicasError(f"{source}={text!r}: {name} count must be 1-{MAX_REPLICAS}")
        counts[name] = count
    return counts


def member_name(service: str, replica: int) -> str:
    """The launcher's name of replica ``replica`` of ``service`` (replica 0: the service's)."""
    return service if replica == 0 else f"{service}{REPLICA_MARK}{replica}"


def service_of(member: str) -> str:
    """The service a member name belongs to."""
    return member.partition(REPLICA_MARK)[0]


def shifted(address: str, by: int, *, variable: str) -> str:
    """``host:port`` with the port moved by ``by``."""
    host, port = parse_hostport(address, variable=variable)
    if not 1 <= port + by <= 65535:
        raise ReplicasError(f"{variable}={address!r}: replica port {port + by} is out of range")
    return f"{host}:{port + by}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Replica:
    """One process of a service: where it listens."""

    service: str
    index: int
    address: str
    """Its mesh (mTLS) ``host:port``."""
    admin_address: str
    public_address: str
    """Its merchant-facing ``host:port``; empty when the service has none."""

    @property
    def name(self) -> str:
        return member_name(self.service, self.index)

    def environ(self) -> dict[str, str]:
        """The overrides that make a process this replica (its own addresses)."""
        spec = next(s for s in SERVICES if s.name == self.service)
        own = {spec.addr_var: self.address, f"{spec.env_prefix}_ADMIN_ADDR": self.admin_address}
        if self.public_address:
            own[f"{spec.env_prefix}_PUBLIC_ADDR"] = self.public_address
        return own


def plan(topology: Topology, counts: Mapping[str, int], step: int) -> dict[str, list[Replica]]:
    """The replicas of every service named in ``counts`` (more than one), from ``topology``.

    Raises:
        ReplicasError: the service's address already lists several endpoints (it is placed
            by someone else), or a replica port is out of range.
    """
    replicas: dict[str, list[Replica]] = {}
    for service, count in counts.items():
        if count < 2:
            continue
        spec = topology.service(service)
        if len(topology.dial(service).endpoints) != 1 or topology.dial(service).dns:
            raise ReplicasError(
                f"{spec.addr_var}={topology.address(service)!r} already names replicas; "
                f"the launcher places them from one host:port"
            )
        admin_var = f"{spec.env_prefix}_ADMIN_ADDR"
        public = topology.public_address(service) or ""
        replicas[service] = [
            Replica(
                service=service,
                index=k,
                address=shifted(topology.address(service), k * step, variable=spec.addr_var),
                admin_address=shifted(
                    topology.admin_address(service), k * step, variable=admin_var
                ),
                public_address=(
                    shifted(public, k * step, variable=f"{spec.env_prefix}_PUBLIC_ADDR")
                    if public
                    else ""
                ),
            )
            for k in range(count)
        ]
    return replicas


def callers_environ(replicas: Mapping[str, list[Replica]]) -> dict[str, str]:
    """Each replicated service's ``*_ADDR`` as every caller dials it: all its replicas."""
    return {
        next(s for s in SERVICES if s.name == service).addr_var: ",".join(
            r.address for r in members
        )
        for service, members in replicas.items()
    }
