"""The mesh's one topology: every service's name, ports, generated API and outgoing edges.

This is the only place a port number or a mesh name is written: services and partners are
the typed constants :class:`Target` and :class:`Partner`, and what a service serves is read
from the generated module its entry names. Every address elsewhere is read from here,
overridable per service by environment (``ORDER_SERVICE_ADDR=host:port``; the variable is
the service name upper-cased with ``-`` as ``_`` plus ``_ADDR``), which may name replicas: a
list ``host:port,host:port`` or a DNS name ``dns:///name:port`` (:func:`parse_dial_address`);
``PAYMESH_PORT_OFFSET=N``
shifts every default port by N (a second mesh on one machine) through
:meth:`Topology.default_port`. Adding a service: ``services/README.md``.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType

LOOPBACK = "127.0.0.1"

#: Variable suffixes that claim to name a mesh address; one that names no declared
#: service or partner is a typo, and a typo in an address is how port drift starts.
_ADDR_SUFFIXES = ("_SERVICE_ADDR", "_GATEWAY_ADDR", "_ADAPTER_ADDR", "_PARTNER_URL")


class TopologyError(ValueError):
    """The topology or an override of it is invalid; the message names what and where."""


class MeshName(StrEnum):
    """A name of the mesh; it is its string everywhere (``str``, f-strings, ``repr``, JSON,
    metadata), so messages and stored values read the same as the plain name."""

    def __repr__(self) -> str:
        return repr(self.value)


class Target(MeshName):
    """The mesh services by name, as callers write them: ``clients.stub(Target.ORDER, ...)``."""

    MERCHANT = "merchant-service"
    PAYMENT_GATEWAY = "payment-gateway"
    ORDER = "order-service"
    CHANNEL_ADAPTER = "channel-adapter"
    RISK = "risk-service"
    ACCOUNTING = "accounting-service"
    NOTIFICATION = "notification-service"
    ANALYTICS = "analytics-service"
    MERCHANT_AUTH = "merchant-auth-service"
    SETTLEMENT = "settlement-service"
    WITHDRAWAL = "withdrawal-service"


class Partner(MeshName):
    """The external HTTP partners by name: ``clients.partner(Partner.GEO_IP)``."""

    EXCHANGE_RATE = "exchange-rate"
    PAYMENT_CHANNEL = "payment-channel"
    GEO_IP = "geo-ip"
    MERCHANT_WEBHOOKS = "merchant-webhooks"
    BANK_TRANSFER = "bank-transfer"


@functools.cache
def generated_module(module: str) -> ModuleType:
    """The generated ``*_pb2`` module ``module``; TopologyError if it does not exist."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TopologyError(f"no generated module {module} (did `make gen` run?)") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """One service of the mesh."""

    name: str
    """Mesh name, as the seed spells it (``order-service``)."""
    module: str
    """Python package that runs it with ``python -m``."""
    port: int
    """gRPC port on the loopback when nothing overrides it."""
    admin_port: int
    """HTTP port for ``/metrics`` and other operator endpoints."""
    proto: str
    """Its generated ``*_pb2`` module (``paymesh.order.v1.order_pb2``): every service that
    proto file declares is what it serves; the names come from the descriptor."""
    calls: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Mesh services it calls, each with the methods it is granted there (``ALL_METHODS`` for
    the whole service). Every call goes through the policy chain; the target's server denies
    any method not granted here to this caller's identity."""
    partners: tuple[str, ...] = ()
    """HTTP partners it calls; also through the policy chain."""
    operator_methods: tuple[str, ...] = ()
    """Methods the operator identity (people and tools) may call."""
    merchant_methods: tuple[str, ...] = ()
    """Methods merchants may call with their API key on the public port."""
    public_port: int | None = None
    """TLS port (server authentication only) of the merchant-facing methods, if it has any."""

    @property
    def proto_services(self) -> tuple[str, ...]:
        """Full names of the gRPC services it serves, from its generated module."""
        names = tuple(
            service.full_name
            for service in generated_module(self.proto).DESCRIPTOR.services_by_name.values()
        )
        if not names:
            raise TopologyError(f"service {self.name!r}: {self.proto} declares no service")
        return names

    @property
    def health_port(self) -> int:
        """Port of its plaintext health-only port in the Kubernetes manifests (off locally)."""
        return self.port + HEALTH_PORT_SHIFT

    @property
    def env_prefix(self) -> str:
        """Prefix of this service's environment variables (``ORDER_SERVICE``)."""
        return env_prefix(self.name)

    @property
    def addr_var(self) -> str:
        """Environment variable that overrides this service's gRPC address."""
        return f"{self.env_prefix}_ADDR"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartnerSpec:
    """An external HTTP partner; ``make run`` serves all of them from the local sandbox."""

    name: str
    """Mesh name of the partner (``exchange-rate``)."""
    path: str
    """Path prefix of the partner's API on the sandbox."""

    @property
    def url_var(self) -> str:
        """Environment variable that overrides this partner's base URL."""
        return f"{env_prefix(self.name)}_PARTNER_URL"


#: The health-only port is the mesh port plus this (40004 -> 43004), clear of admin (41xxx)
#: and public (42xxx) ports.
HEALTH_PORT_SHIFT = 3000

#: Grant of every method of a target's proto services.
ALL_METHODS = ("*",)


def env_prefix(name: str) -> str:
    """Environment prefix of a mesh name: upper case, ``-`` becomes ``_``."""
    return name.upper().replace("-", "_")


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name=Target.MERCHANT,
        module="services.merchant",
        port=40002,
        admin_port=41002,
        public_port=42002,
        proto="paymesh.merchant.v1.merchant_pb2",
        calls={
            Target.PAYMENT_GATEWAY: ("GetPaymentSummary",),
            Target.ACCOUNTING: ("ListBalances",),
            Target.ANALYTICS: ("GetMerchantStats",),
            Target.RISK: ("GetRiskSummary",),
            Target.NOTIFICATION: ("ListNotifications", "RotateWebhookSecret"),
            Target.MERCHANT_AUTH: ("AuthenticateApiKey",),
        },
        operator_methods=(
            "CreateMerchant",
            "GetMerchant",
            "ListMerchants",
            "UpdateMerchantStatus",
            "GetMerchantDashboard",
        ),
        merchant_methods=("GetMerchant", "GetMerchantDashboard", "RotateWebhookSecret"),
    ),
    ServiceSpec(
        name=Target.PAYMENT_GATEWAY,
        module="services.payment_gateway",
        port=40003,
        admin_port=41003,
        public_port=42003,
        proto="paymesh.payment_gateway.v1.payment_gateway_pb2",
        calls={
            Target.MERCHANT_AUTH: ("AuthenticateApiKey",),
            Target.RISK: ("AssessPayment",),
            Target.ORDER: ("CreateOrder", "GetOrder", "UpdateOrderStatus", "UpdateOrderStatuses"),
            Target.CHANNEL_ADAPTER: (
                "Charge",
                "RefundCharge",
                "VoidCharge",
                "GetCharge",
                "ListCharges",
            ),
            Target.ACCOUNTING: ("PostTransaction", "GetTransaction"),
            Target.NOTIFICATION: ("SendNotification", "SendNotifications"),
            Target.ANALYTICS: ("RecordEvent", "RecordEvents"),
        },
        operator_methods=("GetPayment", "ListPayments", "GetPaymentSummary"),
        merchant_methods=(
            "CreatePayment",
            "GetPayment",
            "ListPayments",
            "RefundPayment",
            "GetPaymentSummary",
        ),
    ),
    ServiceSpec(
        name=Target.ORDER,
        module="services.order",
        port=40004,
        admin_port=41004,
        proto="paymesh.order.v1.order_pb2",
        operator_methods=("GetOrder", "ListOrders"),
    ),
    ServiceSpec(
        name=Target.CHANNEL_ADAPTER,
        module="services.channel_adapter",
        port=40005,
        admin_port=41005,
        proto="paymesh.channel_adapter.v1.channel_adapter_pb2",
        partners=(Partner.EXCHANGE_RATE, Partner.PAYMENT_CHANNEL),
        operator_methods=("GetCharge", "ListCharges", "GetExchangeRate"),
    ),
    ServiceSpec(
        name=Target.RISK,
        module="services.risk",
        port=40006,
        admin_port=41006,
        proto="paymesh.risk.v1.risk_pb2",
        partners=(Partner.GEO_IP,),
        operator_methods=("GetAssessment", "GetRiskSummary"),
    ),
    ServiceSpec(
        name=Target.ACCOUNTING,
        module="services.accounting",
        port=40007,
        admin_port=41007,
        proto="paymesh.accounting.v1.accounting_pb2",
        operator_methods=("GetTransaction", "ListEntries", "GetBalance", "ListBalances"),
    ),
    ServiceSpec(
        name=Target.NOTIFICATION,
        module="services.notification",
        port=40008,
        admin_port=41008,
        proto="paymesh.notification.v1.notification_pb2",
        calls={Target.MERCHANT: ("GetMerchant",)},
        partners=(Partner.MERCHANT_WEBHOOKS,),
        operator_methods=("GetNotification", "ListNotifications", "RedeliverNotification"),
    ),
    ServiceSpec(
        name=Target.ANALYTICS,
        module="services.analytics",
        port=40009,
        admin_port=41009,
        proto="paymesh.analytics.v1.analytics_pb2",
        operator_methods=("GetMerchantStats", "ListEvents"),
    ),
    ServiceSpec(
        name=Target.MERCHANT_AUTH,
        module="services.merchant_auth",
        port=40011,
        admin_port=41011,
        proto="paymesh.merchant_auth.v1.merchant_auth_pb2",
        calls={Target.MERCHANT: ("GetMerchant",)},
        operator_methods=("IssueApiKey", "RevokeApiKey", "ListApiKeys"),
    ),
    ServiceSpec(
        name=Target.SETTLEMENT,
        module="services.settlement",
        port=40013,
        admin_port=41013,
        public_port=42013,
        proto="paymesh.settlement.v1.settlement_pb2",
        calls={
            Target.ACCOUNTING: ("GetBalance", "PostTransaction"),
            Target.WITHDRAWAL: ("CreateWithdrawal", "GetWithdrawal"),
            Target.NOTIFICATION: ("SendNotification",),
            Target.MERCHANT: ("GetMerchant",),
            Target.MERCHANT_AUTH: ("AuthenticateApiKey",),
        },
        operator_methods=(
            "GetSettleableBalance",
            "CreateSettlement",
            "GetSettlement",
            "ListSettlements",
        ),
        merchant_methods=("GetSettleableBalance", "GetSettlement", "ListSettlements"),
    ),
    ServiceSpec(
        name=Target.WITHDRAWAL,
        module="services.withdrawal",
        port=40014,
        admin_port=41014,
        public_port=42014,
        proto="paymesh.withdrawal.v1.withdrawal_pb2",
        calls={
            Target.ACCOUNTING: ("PostTransaction",),
            Target.NOTIFICATION: ("SendNotification",),
            Target.MERCHANT: ("GetMerchant",),
            Target.MERCHANT_AUTH: ("AuthenticateApiKey",),
        },
        partners=(Partner.BANK_TRANSFER,),
        operator_methods=("GetWithdrawal", "ListWithdrawals"),
        merchant_methods=("GetWithdrawal", "ListWithdrawals"),
    ),
)

PARTNERS: tuple[PartnerSpec, ...] = (
    PartnerSpec(name=Partner.EXCHANGE_RATE, path="/exchange-rate"),
    PartnerSpec(name=Partner.PAYMENT_CHANNEL, path="/payment-channel"),
    PartnerSpec(name=Partner.GEO_IP, path="/geo-ip"),
    PartnerSpec(name=Partner.MERCHANT_WEBHOOKS, path="/merchant-webhooks"),
    PartnerSpec(name=Partner.BANK_TRANSFER, path="/bank-transfer"),
)

#: The local partner sandbox (one HTTP server for every partner) of ``make run``.
PARTNER_SANDBOX_PORT = 40020
PARTNER_SANDBOX_VAR = "PARTNER_SANDBOX_ADDR"
#: The mesh console (one page for people, ``services.tools.console``) of ``make run``.
CONSOLE_PORT = 40030
CONSOLE_VAR = "PAYMESH_CONSOLE_ADDR"

#: Ports beyond the mesh that services connect to, which the Kubernetes egress policies open:
#: PostgreSQL and Redis at their standard ports, the partners over HTTPS.
POSTGRESQL_PORT = 5432
REDIS_PORT = 6379
HTTPS_PORT = 443
#: The engines ``make run-replicas`` starts as its own processes (below the ephemeral range,
#: shifted by ``PAYMESH_PORT_OFFSET`` like every default port).
LOCAL_POSTGRESQL_PORT = 25432
LOCAL_REDIS_PORT = 26379

#: Added to every default port (never to an explicit ``*_ADDR``): a second mesh on one machine.
PORT_OFFSET_VAR = "PAYMESH_PORT_OFFSET"
#: Replica k of a service run locally listens on each of its ports plus k times this.
REPLICA_PORT_STEP_VAR = "PAYMESH_REPLICA_PORT_STEP"
DEFAULT_REPLICA_PORT_STEP = 100


def replica_port_step(environ: Mapping[str, str]) -> int:
    """``PAYMESH_REPLICA_PORT_STEP``, else the default; TopologyError unless a whole number
    1-1000."""
    raw = environ.get(REPLICA_PORT_STEP_VAR, "").strip()
    if not raw:
        return DEFAULT_REPLICA_PORT_STEP
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise TopologyError(
            f"{REPLICA_PORT_STEP_VAR}={raw!r} is not a whole number 1-1000 "
            f"(default {DEFAULT_REPLICA_PORT_STEP})"
        )
    return int(raw)


def port_offset(environ: Mapping[str, str]) -> int:
    """``PAYMESH_PORT_OFFSET`` as an integer (may be negative), 0 when unset or empty.

    Raises:
        TopologyError: it is not an integer.
    """
    raw = environ.get(PORT_OFFSET_VAR, "")
    try:
        return int(raw.strip() or "0")
    except ValueError:
        raise TopologyError(
            f"{PORT_OFFSET_VAR}={raw!r} is not an integer (example: 100 shifts 40002 to 40102)"
        ) from None


_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


def parse_hostport(value: str, *, variable: str) -> tuple[str, int]:
    """Split ``host:port``; raise TopologyError naming ``variable`` when it is not one."""
    match = _HOSTPORT.match(value.strip())
    if match is None:
        raise TopologyError(f"{variable}={value!r} is not host:port (example: 127.0.0.1:40004)")
    host, port = match["host"], int(match["port"])
    if not 0 <= port <= 65535:
        raise TopologyError(f"{variable}={value!r}: port {port} is outside 0-65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise TopologyError(f"{variable}={value!r}: {host} is not an IPv6 address") from exc
    return host, port


#: ``dns:///host:port`` or ``dns://authority/host:port`` (gRPC's DNS resolver, re-resolved).
_DNS_TARGET = re.compile(r"^dns://(?P<authority>[^/]*)/(?P<hostport>.+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class DialAddress:
    """Where the replicas of one service are, as a gRPC channel resolves them."""

    target: str
    """The channel target: ``host:port`` (one endpoint), ``ipv4:a:p,b:q`` / ``ipv6:...`` (a
    fixed list of replicas) or ``dns:///name:port`` (every address the name resolves to)."""
    endpoints: tuple[str, ...]
    """The ``host:port`` of each listed replica; for a DNS target, the one name."""
    dns: bool = False
    """Whether the replicas are what a DNS name resolves to (re-resolved on reconnect)."""


def parse_dial_address(value: str, *, variable: str) -> DialAddress:
    """Parse a ``*_ADDR``: ``host:port``, ``ip:port,ip:port,...`` or ``dns:///host:port``.

    A list must be IP literals of one family (gRPC's ``ipv4:``/``ipv6:`` resolvers take no
    names); replicas behind a name are a DNS target.

    Raises:
        TopologyError: naming ``variable``, when it is none of these.
    """
    text = value.strip()
    dns = _DNS_TARGET.match(text)
    if dns is not None:
        if _HOSTPORT.match(dns["hostport"]) is None:
            raise TopologyError(
                f"{variable}={value!r}: a DNS target is dns:///host:port "
                "(example: dns:///order-service.paymesh:40004)"
            )
        return DialAddress(target=text, endpoints=(dns["hostport"],), dns=True)
    parts = [part.strip() for part in text.split(",")]
    if len(parts) == 1:
        parse_hostport(parts[0], variable=variable)
        return DialAddress(target=parts[0], endpoints=(parts[0],))
    families: set[int] = set()
    for part in parts:
        host, _ = parse_hostport(part, variable=variable)
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise TopologyError(
                f"{variable}={value!r}: {host} is a name; a list of replicas takes IP "
                "addresses (replicas behind a name: dns:///name:port)"
            ) from None
    if len(parts) != len(set(parts)):
        raise TopologyError(f"{variable}={value!r} lists an endpoint twice")
    if len(families) != 1:
        raise TopologyError(f"{variable}={value!r} mixes IPv4 and IPv6 addresses")
    scheme = "ipv4" if families == {4} else "ipv6"
    return DialAddress(target=f"{scheme}:{','.join(parts)}", endpoints=tuple(parts))


@dataclass(frozen=True, slots=True)
class Topology:
    """The declared services and partners, validated, with environment overrides applied."""

    services: tuple[ServiceSpec, ...] = SERVICES
    partners: tuple[PartnerSpec, ...] = PARTNERS
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        validate(self.services, self.partners)
        for port in self._declared_ports():
            self.default_port(port)  # an offset that pushes one out of range fails here, at once
        for key, value in self.environ.items():
            if key.endswith(_ADDR_SUFFIXES) and key not in self._known_variables():
                raise TopologyError(
                    f"{key}={value!r} names no service or partner of the topology; "
                    f"known: {', '.join(sorted(self._known_variables()))}"
                )
            if key in self._known_variables() and key.endswith("_ADDR"):
                parse_dial_address(value, variable=key)
            if key.endswith("_PARTNER_URL") and not value.startswith(("http://", "https://")):
                raise TopologyError(f"{key}={value!r} is not an http:// or https:// URL")

    def _declared_ports(self) -> tuple[int, ...]:
        """Every default port of the topology; a new default port belongs here too."""
        ports = (p for s in self.services for p in (s.port, s.admin_port, s.public_port))
        return (
            *(p for p in ports if p is not None),
            PARTNER_SANDBOX_PORT,
            CONSOLE_PORT,
            LOCAL_POSTGRESQL_PORT,
            LOCAL_REDIS_PORT,
        )

    def default_port(self, port: int) -> int:
        """``port`` shifted by ``PAYMESH_PORT_OFFSET``: every default address goes through here.

        Raises:
            TopologyError: the offset is not an integer or moves ``port`` outside 1-65535.
        """
        offset = port_offset(self.environ)
        shifted = port + offset
        if not 1 <= shifted <= 65535:
            raise TopologyError(
                f"{PORT_OFFSET_VAR}={offset}: default port {port} would become {shifted}, "
                "outside 1-65535"
            )
        return shifted

    def _default_address(self, port: int) -> str:
        return f"{LOOPBACK}:{self.default_port(port)}"

    def _known_variables(self) -> set[str]:
        names = {s.addr_var for s in self.services} | {p.url_var for p in self.partners}
        return names | {PARTNER_SANDBOX_VAR}

    def service(self, name: str) -> ServiceSpec:
        """The spec of ``name``; TopologyError when no such service is declared."""
        for spec in self.services:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.services)
        raise TopologyError(f"unknown service {name!r}; known: {known}")

    def address(self, name: str) -> str:
        """The address callers of a service dial as written: its override (one endpoint, a
        list of replicas or a ``dns:///`` name), else the loopback and declared port."""
        spec = self.service(name)
        return self.environ.get(spec.addr_var) or self._default_address(spec.port)

    def dial(self, name: str) -> DialAddress:
        """Where a service's replicas are, parsed: the gRPC target and the endpoints."""
        return parse_dial_address(self.address(name), variable=self.service(name).addr_var)

    def bind_address(self, name: str) -> tuple[str, int]:
        """Host and port a service listens on: ``<PREFIX>_LISTEN_ADDR`` (``0.0.0.0:40004`` in a
        pod, where callers dial a DNS name), else the address its callers dial."""
        spec = self.service(name)
        listen_var = f"{spec.env_prefix}_LISTEN_ADDR"
        if listen := self.environ.get(listen_var):
            return parse_hostport(listen, variable=listen_var)
        dial = self.dial(name)
        if len(dial.endpoints) != 1 or dial.dns:
            raise TopologyError(
                f"{spec.addr_var}={self.address(name)!r} names several replicas (what callers "
                f"dial); set {listen_var} to the one host:port this replica listens on"
            )
        return parse_hostport(dial.endpoints[0], variable=spec.addr_var)

    def health_address(self, name: str) -> tuple[str, int] | None:
        """Host and port of the plaintext health-only port (``<PREFIX>_HEALTH_ADDR``), None
        when unset: off unless asked for, as only kubelet's probes (no TLS) need it."""
        var = f"{self.service(name).env_prefix}_HEALTH_ADDR"
        value = self.environ.get(var)
        return parse_hostport(value, variable=var) if value else None

    def admin_address(self, name: str) -> str:
        """``host:port`` of a service's admin HTTP endpoint (``<PREFIX>_ADMIN_ADDR``)."""
        spec = self.service(name)
        var = f"{spec.env_prefix}_ADMIN_ADDR"
        value = self.environ.get(var) or self._default_address(spec.admin_port)
        parse_hostport(value, variable=var)
        return value

    def public_address(self, name: str) -> str | None:
        """``host:port`` of a service's merchant-facing TLS port (``<PREFIX>_PUBLIC_ADDR``),
        None when it has no merchant methods."""
        spec = self.service(name)
        if spec.public_port is None:
            return None
        var = f"{spec.env_prefix}_PUBLIC_ADDR"
        value = self.environ.get(var) or self._default_address(spec.public_port)
        parse_hostport(value, variable=var)
        return value

    def sandbox_address(self) -> str:
        """``host:port`` of the partner sandbox."""
        value = self.environ.get(PARTNER_SANDBOX_VAR) or self._default_address(PARTNER_SANDBOX_PORT)
        parse_hostport(value, variable=PARTNER_SANDBOX_VAR)
        return value

    def console_address(self) -> str:
        """``host:port`` of the mesh console (``PAYMESH_CONSOLE_ADDR``)."""
        value = self.environ.get(CONSOLE_VAR) or self._default_address(CONSOLE_PORT)
        parse_hostport(value, variable=CONSOLE_VAR)
        return value

    def partner_url(self, name: str) -> str:
        """Base URL of a partner: its override, else its path on the sandbox."""
        for partner in self.partners:
            if partner.name == name:
                override = self.environ.get(partner.url_var)
                return (override or f"http://{self.sandbox_address()}{partner.path}").rstrip("/")
        raise TopologyError(
            f"unknown partner {name!r}; known: {', '.join(p.name for p in self.partners)}"
        )


def validate(services: tuple[ServiceSpec, ...], partners: tuple[PartnerSpec, ...]) -> None:
    """Check names, ports and edges; raise TopologyError on the first problem."""
    names: set[str] = set()
    ports: dict[int, str] = {}
    partner_names = {p.name for p in partners}
    for spec in services:
        if spec.name in names:
            raise TopologyError(f"service {spec.name!r} is declared twice")
        names.add(spec.name)
        _ = spec.proto_services  # TopologyError unless its generated module declares services
        if bool(spec.merchant_methods) != (spec.public_port is not None):
            raise TopologyError(
                f"service {spec.name!r}: a public port exactly when it has merchant methods"
            )
        if spec.merchant_methods and "AuthenticateApiKey" not in spec.calls.get(
            Target.MERCHANT_AUTH, ()
        ):
            raise TopologyError(
                f"service {spec.name!r} has merchant methods, so it must be granted "
                "merchant-auth-service AuthenticateApiKey to check their API keys"
            )
        for port in (spec.port, spec.admin_port, *filter(None, (spec.public_port,))):
            if not 1 <= port <= 65535:
                raise TopologyError(f"service {spec.name!r}: port {port} is outside 1-65535")
            if port in ports:
                raise TopologyError(
                    f"port {port} is declared by both {ports[port]!r} and {spec.name!r}"
                )
            ports[port] = spec.name
    for spec in services:
        for target, methods in spec.calls.items():
            if not methods:
                raise TopologyError(f"edge {spec.name} -> {target} grants no method")
            if target not in names:
                raise TopologyError(f"edge {spec.name} -> {target}: {target!r} is not declared")
            if target == spec.name:
                raise TopologyError(f"edge {spec.name} -> {target}: a service cannot call itself")
        for partner in spec.partners:
            if partner not in partner_names:
                raise TopologyError(f"edge {spec.name} -> {partner}: no such partner declared")
