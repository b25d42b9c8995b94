"""Who may call what: the topology's grants enforced on the verified caller of every call.

Istio/gRFC A43 semantics from our one topology: default deny; a mesh caller (its SPIFFE id
from the client certificate) may call the methods its edge grants, the operator identity its
``operator_methods``; health is open to every peer; reflection to every verified identity
(off with ``PAYMESH_REFLECTION=0``). A caller without a certificate reaches only the
merchant-facing port and there only ``merchant_methods``, each with an API key in
``authorization: Bearer <secret>``, checked at merchant-auth-service; the authenticated
merchant is then :func:`current_merchant` for the servicer.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.descriptor import ServiceDescriptor

from interceptors.errors import Reason
from services.mesh.errors import NotFound, PermissionDenied, Unauthenticated
from services.mesh.pki import OPERATOR
from services.mesh.tls import peer_identity
from services.mesh.topology import (
    ALL_METHODS,
    ServiceSpec,
    Topology,
    TopologyError,
    generated_module,
)

#: The Diagnostics RPC every service serves; for the operator only.
DIAGNOSTICS_METHOD = "/paymesh.mesh.v1.DiagnosticsService/GetDiagnostics"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")
#: Metadata a merchant-facing service forwards to merchant-auth: where the merchant connected from.
CLIENT_PEER_KEY = "x-paymesh-client-peer"
AUTHORIZATION_KEY = "authorization"
#: Certificates whose SPIFFE id a gate remembers (forgotten all at once beyond it).
MAX_CACHED_IDENTITIES = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticatedMerchant:
    """The merchant whose API key authenticated the current call."""

    merchant_id: str
    """The merchant the key belongs to."""
    key_id: str
    """Public id of the key that was used."""
    active: bool
    """Whether the merchant is active (not suspended)."""
    webhook_url: str
    """The merchant's webhook URL, possibly empty."""


_MERCHANT: contextvars.ContextVar[AuthenticatedMerchant | None] = contextvars.ContextVar(
    "paymesh_merchant", default=None
)


def current_merchant() -> AuthenticatedMerchant | None:
    """The merchant of the call being served; None when a mesh identity is calling."""
    return _MERCHANT.get()


def merchant_scope(requested_merchant_id: str) -> str:
    """The merchant a request may act for: the authenticated merchant's own id.

    A merchant naming another merchant gets NOT_FOUND (never a hint that it exists); an empty
    id means "my own". Mesh callers were authorized by the topology and act for whichever
    merchant the request names.
    """
    merchant = _MERCHANT.get()
    if merchant is None:
        return requested_merchant_id
    if requested_merchant_id and requested_merchant_id != merchant.merchant_id:
        raise NotFound(
            f"merchant {requested_merchant_id[:64]!r} not found",
            reason=Reason.MERCHANT_NOT_FOUND,
        )
    return merchant.merchant_id


def service_descriptors(spec: ServiceSpec) -> tuple[ServiceDescriptor, ...]:
    """The descriptors of the proto services ``spec`` serves, from its generated module."""
    return tuple(generated_module(spec.proto).DESCRIPTOR.services_by_name.values())


def method_paths(spec: ServiceSpec, names: Iterable[str]) -> set[str]:
    """Full paths (``/pkg.Service/Method``) of ``names`` in ``spec``'s proto services.

    Raises:
        TopologyError: a name is not a method of the service (a typo in a grant).
    """
    by_name: dict[str, str] = {}
    for service in service_descriptors(spec):
        for method in service.methods:
            by_name[method.name] = f"/{service.full_name}/{method.name}"
    wanted = list(names)
    if tuple(wanted) == ALL_METHODS:
        return set(by_name.values())
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise TopologyError(
            f"{spec.name} has no method {', '.join(unknown)}; "
            f"it serves {', '.join(sorted(by_name))}"
        )
    return {by_name[name] for name in wanted}


def grants(topology: Topology, target: str) -> dict[str, frozenset[str]]:
    """Method path -> the identity names granted it on ``target`` (mesh callers, operator)."""
    spec = topology.service(target)
    table: dict[str, set[str]] = {path: set() for path in method_paths(spec, ALL_METHODS)}
    for caller in topology.services:
        methods = caller.calls.get(target)
        if methods:
            for path in method_paths(spec, methods):
                table[path].add(caller.name)
    for path in method_paths(spec, spec.operator_methods):
        table[path].add(OPERATOR)
    table[DIAGNOSTICS_METHOD] = {OPERATOR}
    return {path: frozenset(names) for path, names in table.items()}


class Authenticator(Protocol):
    """Checks a merchant API key (merchant-auth-service, through the policy chain)."""

    def __call__(
        self, secret: str, client_peer: str
    ) -> Awaitable[AuthenticatedMerchant]: ...  # pragma: no cover - protocol


@dataclass(frozen=True, slots=True)
class Admission:
    """What the gate decided for one call; ``reset`` undoes what it set for the servicer."""

    caller: str
    """Identity name of the caller (``order-service``, ``operator``, ``merchant:<id>``)."""
    token: contextvars.Token[AuthenticatedMerchant | None] | None = None

    def reset(self) -> None:
        """Forget the authenticated merchant once the call is done."""
        if self.token is not None:
            _MERCHANT.reset(self.token)


class CallGate:
    """Decides, for each incoming call, whether its verified caller may make it."""

    def __init__(
        self,
        *,
        service: str,
        topology: Topology,
        spiffe_id_of: Callable[[str], str],
        authenticate: Authenticator | None,
        reflection: bool = True,
        plaintext: bool = False,
    ) -> None:
        spec = topology.service(service)
        self._service = service
        by_name = grants(topology, service)
        names = {name for allowed in by_name.values() for name in allowed}
        everyone = names | {OPERATOR} | {s.name for s in topology.services}
        self._name_of = {spiffe_id_of(name): name for name in everyone}
        self._mesh_ids = {spiffe_id_of(s.name) for s in topology.services} | {
            spiffe_id_of(OPERATOR)
        }
        self._allowed = {
            path: frozenset(spiffe_id_of(name) for name in allowed)
            for path, allowed in by_name.items()
        }
        self._merchant_paths = frozenset(method_paths(spec, spec.merchant_methods))
        self._authenticate = authenticate
        self._reflection = reflection
        self._plaintext = plaintext
        #: The certificate's SANs (cheap to read) -> its verified SPIFFE id (reading the whole
        #: auth context costs more than the rest of the decision): a connection's certificate
        #: is the same on each of its calls.
        self._identities: dict[tuple[bytes, ...], str | None] = {}
        #: Caller SPIFFE id -> its admission (immutable, shared by its calls).
        self._admissions = {
            spiffe: Admission(caller=name) for spiffe, name in self._name_of.items()
        }

    def _peer_id(self, context: Any) -> str | None:
        """The caller's verified SPIFFE id (``services.mesh.tls.peer_identity``), cached by
        the certificate's subject alternative names."""
        sans = context.peer_identities()
        if not sans:
            return None  # no client certificate (merchant port, plaintext)
        key = tuple(sans)
        try:
            return self._identities[key]
        except KeyError:
            pass
        peer_id = peer_identity(context)
        if len(self._identities) >= MAX_CACHED_IDENTITIES:
            self._identities.clear()  # bounded: a mesh has a few dozen identities
        self._identities[key] = peer_id
        return peer_id

    def allowed(self, method: str, peer_id: str | None) -> bool:
        """Whether identity ``peer_id`` (None: no certificate) may call ``method`` at all."""
        if method.startswith(HEALTH_PREFIX):
            return True
        if method.startswith(REFLECTION_PREFIXES):
            return self._reflection and (peer_id in self._mesh_ids or self._plaintext)
        if peer_id is None:
            return method in self._merchant_paths
        return peer_id in self._allowed.get(method, ())

    def check_stream(self, method: str, context: Any) -> None:
        """The check of a call that carries no API key (reflection, health)."""
        peer_id = self._peer_id(context)
        if not self.allowed(method, peer_id):
            raise self._denied(method, peer_id)

    def admit_now(self, method: str, context: Any) -> Admission | None:
        """A mesh caller's admission, decided without awaiting: admitted, or PermissionDenied;
        None when there is no certificate, so :meth:`admit` must look at an API key."""
        peer_id = self._peer_id(context)
        if peer_id is None:
            return None
        if peer_id not in self._allowed.get(method, ()):
            raise self._denied(method, peer_id)
        return self._admissions.get(peer_id) or Admission(caller=peer_id)

    async def admit(self, method: str, context: Any) -> Admission:
        """Admit the call or raise PermissionDenied / Unauthenticated naming why."""
        peer_id = self._peer_id(context)
        if peer_id is None and self._plaintext:
            # Plaintext development mesh (PAYMESH_INSECURE=1): no identity exists, so nothing
            # can be authorized; a call with an API key still runs as its merchant.
            if bearer_token(context.invocation_metadata() or ()) is None:
                return Admission(caller="plaintext")
            return await self._merchant(method, context)
        if peer_id is None:
            if method not in self._merchant_paths:
                raise self._denied(method, peer_id)
            return await self._merchant(method, context)
        if peer_id not in self._allowed.get(method, ()):
            raise self._denied(method, peer_id)
        return self._admissions.get(peer_id) or Admission(caller=peer_id)

    async def _merchant(self, method: str, context: Any) -> Admission:
        secret = bearer_token(context.invocation_metadata() or ())
        if secret is None:
            raise Unauthenticated(
                f"{method} needs the merchant's API key in metadata 'authorization: Bearer <key>'",
                reason=Reason.CREDENTIALS_MISSING,
                metadata={"method": method},
            )
        if self._authenticate is None:
            raise Unauthenticated(
                f"{self._service} cannot check API keys", reason=Reason.CREDENTIALS_MISSING
            )
        merchant = await self._authenticate(secret, str(context.peer()))
        token = _MERCHANT.set(merchant)
        return Admission(caller=f"merchant:{merchant.merchant_id}", token=token)

    def _denied(self, method: str, peer_id: str | None) -> PermissionDenied | Unauthenticated:
        if peer_id is None:
            return Unauthenticated(
                f"{method} of {self._service} is not merchant-facing; it needs a mesh identity "
                "(mTLS client certificate)",
                reason=Reason.CREDENTIALS_MISSING,
                metadata={"method": method, "service": self._service},
            )
        caller = self._name_of.get(peer_id, peer_id)
        return PermissionDenied(
            f"{caller} is not granted {method} on {self._service}",
            reason=Reason.CALLER_NOT_AUTHORIZED,
            metadata={"caller": caller, "method": method, "service": self._service},
        )


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The secret of an ``authorization: Bearer <secret>`` entry, or None."""
    for key, value in metadata:
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, secret = value.partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return secret.strip()
    return None


def merchant_of(response: Any) -> AuthenticatedMerchant:
    """An AuthenticateApiKeyResponse as the merchant the call runs for."""
    return AuthenticatedMerchant(
        merchant_id=response.merchant_id,
        key_id=response.key_id,
        active=response.active,
        webhook_url=response.webhook_url,
    )


def table(topology: Topology) -> Mapping[str, Mapping[str, frozenset[str]]]:
    """Service -> method path -> identity names granted it (the README's who-may-call-what)."""
    return {spec.name: grants(topology, spec.name) for spec in topology.services}


def markdown_table(topology: Topology) -> str:
    """Who may call what, as the README's markdown table (``python -m services.mesh.authz``)."""
    lines = [
        "| service | method | mesh callers | operator | merchants (API key) |",
        "|---|---|---|---|---|",
    ]
    for spec in topology.services:
        merchant = method_paths(spec, spec.merchant_methods)
        for path, names in sorted(grants(topology, spec.name).items()):
            if path == DIAGNOSTICS_METHOD:
                continue
            callers = ", ".join(sorted(n for n in names if n != OPERATOR)) or "-"
            lines.append(
                f"| {spec.name} | {path.rsplit('/', 1)[1]} | {callers} | "
                f"{'yes' if OPERATOR in names else '-'} | {'yes' if path in merchant else '-'} |"
            )
    lines.append("| every service | Diagnostics/GetDiagnostics | - | yes | - |")
    lines.append("| every service | grpc.health.v1.Health/* | every peer | yes | yes |")
    lines.append("| every service | grpc.reflection.* | every mesh identity | yes | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(Topology()))
