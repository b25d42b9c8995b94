"""One start-up for every service: gRPC aio server, health, reflection, signals, graceful stop.

A service's ``__main__`` calls :func:`run` with its name and a builder that returns its
servicers; everything else (binding without SO_REUSEPORT, grpc.health.v1 with List,
reflection v1alpha and v1 from one descriptor pool, the server interceptor, the client
factory, SIGTERM/SIGINT handling) lives here once.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from interceptors.chain import build_client_chain
from interceptors.errors import (
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    error_info,
    retry_delay_of,
    status_from_metadata,
)
from interceptors.policy import PolicyConfig, PolicyError
from interceptors.tracing import server_interceptor
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.mesh.v1 import mesh_pb2_grpc
from services.mesh import page_tokens
from services.mesh.admin import AdminRequest, AdminResponse, AdminServer, guarded
from services.mesh.admin_token import AdminTokenError, ControlAccess
from services.mesh.authz import (
    AUTHORIZATION_KEY,
    CLIENT_PEER_KEY,
    AuthenticatedMerchant,
    Authenticator,
    CallGate,
    merchant_of,
)
from services.mesh.clients import ClientFactory
from services.mesh.diagnostics import (
    DIAGNOSTICS_SERVICE,
    DiagnosticsServicer,
    ReadinessMonitor,
    healthz_max_lag_s,
    process_health,
)
from services.mesh.faults import Fault, FaultInjector
from services.mesh.limits import LimitsError, ServerLimits
from services.mesh.metrics import ServiceMetrics
from services.mesh.page_tokens import PageTokenKeyError
from services.mesh.recent import RecentCalls
from services.mesh.server import ServerPolicyInterceptor
from services.mesh.tls import TlsConfigError, TransportSecurity
from services.mesh.topology import Topology, TopologyError, env_prefix, parse_hostport
from services.mesh.tracing import (
    TraceIdFilter,
    log_format,
    records_spans,
    service_tracer_provider,
)
from services.storage import idempotency, sql

log = logging.getLogger("paymesh.bootstrap")

#: Printed on stdout once serving, so a supervisor can learn an ephemeral port.
READY_MARKER = "PAYMESH_READY"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
DEFAULT_GRACE_S = 5.0
#: How often a service looks for a rotated certificate of its own (``PAYMESH_TLS_RELOAD_S``).
DEFAULT_TLS_RELOAD_S = 30.0
_PR_SET_PDEATHSIG = 1
#: Exit code of a start-up that failed on configuration (bad override, taken port, ...).
EXIT_CONFIG = 2
#: merchant-auth failures that say it could not answer (not a verdict on the key).
AUTH_UNREACHABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
)
#: RetryInfo of a merchant call merchant-auth could not check, when nothing says better.
AUTH_UNREACHABLE_RETRY_S = 1.0


#: The context every servicer method receives (requests and responses typed per method).
Context = aio.ServicerContext[Any, Any]


class StartupError(RuntimeError):
    """The service cannot start; the message says why in words an operator can act on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """One servicer and how to put it on a server."""

    servicer: object
    """The servicer instance."""
    add_to_server: Callable[[Any, aio.Server], None]
    """The generated ``add_XxxServicer_to_server`` function."""
    service_name: str
    """Full proto name of the service, for health and reflection."""


@dataclass(slots=True, kw_only=True)
class ServiceContext:
    """What a service's builder gets: its name, the topology, clients and storage paths."""

    name: str
    """Mesh name of the service."""
    topology: Topology
    """The validated topology, overrides applied."""
    clients: ClientFactory
    """Makes every downstream stub and partner client through the policy chain."""
    admin: AdminServer = field(default_factory=AdminServer)
    """The admin HTTP endpoint; a service may add routes before it starts."""
    faults: FaultInjector = field(default_factory=FaultInjector)
    """Faults injected into this service's handlers (switched through ``/faults``)."""
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    """Environment the service was started with."""
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    """Callbacks run after the server stopped (close stores, flush, ...)."""
    database: Path | None = None
    """The SQLite file, once the builder asked for it; its readiness is the service's."""
    prechecks: dict[str, Callable[[], None]] = field(default_factory=dict)
    """Per full method path (``/pkg.Service/Method``), a check the server runs before the
    gate admits a call: it raises a ServiceError to refuse at once (fail fast before any
    authentication or work); it must not block."""

    @property
    def var_dir(self) -> Path:
        """Directory for the service's files: ``PAYMESH_VAR_DIR`` or ``var/``."""
        return Path(self.environ.get("PAYMESH_VAR_DIR", "var"))

    def database_path(self) -> Path:
        """SQLite file: ``<PREFIX>_DATABASE_URL`` (sqlite:///path), else var/<name>.db."""
        var = f"{env_prefix(self.name)}_DATABASE_URL"
        url = self.environ.get(var)
        if url is None:
            path = self.var_dir / f"{self.name}.db"
        else:
            try:
                path = sql.path_of_url(url)
            except sql.UnsupportedDatabaseUrl as exc:
                raise StartupError(f"{var}={exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.database = path
        return path


Builder = Callable[[ServiceContext], Sequence[Registration] | Awaitable[Sequence[Registration]]]


class MeshHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]  # untyped base
    """grpc.health.v1 with ``List``, which grpcio-health-checking does not implement."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


def _add_reflection(server: aio.Server, names: Sequence[str]) -> None:
    """Serve reflection as v1alpha and, from the same servicer, as v1.

    grpcio-reflection ships only v1alpha; v1 has the same messages field for field, so the
    v1alpha servicer answers v1 requests unchanged (newer grpcurl asks v1 first).
    """
    # v1 is served but not listed: its descriptor is not in the pool, and listing a name that
    # cannot be described makes grpcurl and buf curl give up on the whole listing.
    all_names = (*names, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(all_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handler = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1_handler,))


def _admin_routes(context: ServiceContext) -> None:
    """``/healthz`` (event loop lag, database ``SELECT 1``; 503 naming what failed) and
    ``/breakers`` (the chain's breaker and budget states), open to read,
    and ``/faults`` (GET the faults, PUT a JSON list of faults, DELETE them) behind the
    control gate: refused unless ``PAYMESH_FAULT_INJECTION=1``, then only with the admin token.

    Raises:
        StartupError: fault injection is enabled without a usable admin token file, or
            ``PAYMESH_HEALTHZ_MAX_LAG_S`` is not a positive number.
    """
    try:
        access = ControlAccess.from_environ(context.environ)
    except AdminTokenError as exc:
        raise StartupError(str(exc)) from exc
    if access.enabled:
        log.warning("fault injection is ON: /faults on the admin port takes the admin token")
    try:
        max_lag_s = healthz_max_lag_s(context.environ)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc

    async def healthz(request: AdminRequest) -> AdminResponse:
        # The process itself: its event loop's lag and its database (503 names what failed).
        status, body = await process_health(
            context.name, database=context.database, max_lag_s=max_lag_s
        )
        return AdminResponse.of_json(body, status)

    def faults(request: AdminRequest) -> AdminResponse:
        if request.method == "PUT":
            body = request.json()
            if not isinstance(body, list):
                raise ValueError("PUT /faults takes a JSON list of fault objects")
            context.faults.set([Fault.from_mapping(item) for item in body])
            log.warning("faults set from %s: %s", request.peer, context.faults.snapshot())
        elif request.method == "DELETE":
            context.faults.clear()
            log.info("faults cleared from %s", request.peer)
        return AdminResponse.of_json({"faults": context.faults.snapshot()})

    def breakers(request: AdminRequest) -> AdminResponse:
        return AdminResponse.of_json(context.clients.chain.diagnostics())

    context.admin.route("GET", "/healthz", healthz)
    context.admin.route("GET", "/breakers", breakers)
    for method in ("GET", "PUT", "DELETE"):
        context.admin.route(method, "/faults", guarded(access, faults))


def configure_logging(name: str) -> None:
    """One line per record, naming the service and trace; level from ``PAYMESH_LOG_LEVEL``."""
    logging.basicConfig(
        level=os.environ.get("PAYMESH_LOG_LEVEL", "INFO").upper(),
        format=log_format(name),
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceIdFilter())


async def serve(
    name: str,
    build: Builder,
    *,
    topology: Topology | None = None,
    policy: PolicyConfig | None = None,
    grace_s: float | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_public_ready: Callable[[str], None] | None = None,
    span_processors: Sequence[SpanProcessor] = (),
) -> None:
    """Run service ``name`` until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully.

    Spans go where the ``OTEL_*`` variables say, and to ``span_processors`` (tests).
    ``on_ready`` is told the bound mesh address, ``on_public_ready`` the merchant-facing one.

    Raises:
        StartupError: the address is taken or invalid, or the builder refused to start.
    """
    try:
        topology = topology or Topology()
        spec = topology.service(name)
        host, port = topology.bind_address(name)
        public = topology.public_address(name)
        limits = ServerLimits.from_environ(spec.env_prefix, topology.environ)
        security = TransportSecurity.from_environ(name, topology.environ)
        # Read now, so a bad key file or retention stops start-up instead of a first call.
        page_tokens.process_codec()
        idempotency.default_retention()
    except (TopologyError, LimitsError, TlsConfigError, PageTokenKeyError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    if security.plaintext:
        log.warning(
            "PAYMESH_INSECURE is set: %s serves PLAINTEXT, without TLS, identities or "
            "authorization of mesh callers; never do this outside a development machine",
            name,
        )
    if policy is None:
        targets = {s.name for s in topology.services} | {p.name for p in topology.partners}
        try:
            policy = PolicyConfig.load(
                topology.environ.get("PAYMESH_POLICY_FILE"), known_targets=targets
            )
        except PolicyError as exc:
            raise StartupError(f"bad policy configuration: {exc}") from exc
    grace = (
        grace_s
        if grace_s is not None
        else float(os.environ.get("PAYMESH_GRACE_S", DEFAULT_GRACE_S))
    )
    tracer_provider = service_tracer_provider(
        name, topology.environ, span_processors=span_processors
    )
    chain = build_client_chain(
        caller=name,
        config=policy,
        tracer_provider=tracer_provider,
        trace_calls=records_spans(topology.environ, span_processors=span_processors),
    )
    clients = ClientFactory(caller=name, topology=topology, chain=chain, security=security)
    context = ServiceContext(
        name=name, topology=topology, clients=clients, environ=dict(topology.environ)
    )
    built = build(context)
    registrations = await built if inspect.isawaitable(built) else built

    _admin_routes(context)
    metrics, recent = ServiceMetrics(service=name), RecentCalls()
    metrics.follow_chain(chain.telemetry, chain.breakers.states, (*spec.calls, *spec.partners))
    chain.telemetry.add_call_hook(recent.record_call)
    chain.telemetry.add_hook(recent.count)
    context.admin.route("GET", "/metrics", metrics.handle)
    gate = CallGate(
        service=name,
        topology=topology,
        spiffe_id_of=security.spiffe_id_of,
        authenticate=_merchant_authenticator(clients) if spec.merchant_methods else None,
        reflection=topology.environ.get("PAYMESH_REFLECTION", "1") != "0",
        plaintext=security.plaintext,
    )
    server = aio.server(
        interceptors=[
            server_interceptor(tracer_provider),  # first: the policy's work is in the span
            ServerPolicyInterceptor(
                domain=name,
                faults=context.faults,
                observers=(metrics.observe_server,),
                gate=gate,
                max_in_flight=limits.max_in_flight,
                on_shed=metrics.count_shed,
                prechecks=context.prechecks,
            ),
        ],
        # A taken port must be an error, never a silent second listener.
        options=[("grpc.so_reuseport", 0), *limits.grpc_options()],
    )
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    names = [r.service_name for r in registrations]
    missing = set(spec.proto_services) - set(names)
    if missing:
        raise StartupError(f"{name} must serve {sorted(missing)} as the topology declares")
    diagnostics = DiagnosticsServicer(
        spec=spec,
        topology=topology,
        breaker_states=chain.breakers.states,
        recent=recent,
        database=context.database,
        open_channel=lambda target, address: security.aio_channel(
            target, address, options=chain.channel_options()
        ),
    )
    mesh_pb2_grpc.add_DiagnosticsServiceServicer_to_server(diagnostics, server)
    health = MeshHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    _add_reflection(server, (*names, DIAGNOSTICS_SERVICE, health_name))

    bound = _listen(server, name, f"{host}:{port}", security, require_client_cert=True)
    public_bound = (
        _listen(server, name, public, security, require_client_cert=False) if public else None
    )
    await server.start()
    admin_host, admin_port = parse_hostport(
        topology.admin_address(name), variable=f"{spec.env_prefix}_ADMIN_ADDR"
    )
    try:
        admin_bound = await context.admin.start(admin_host, admin_port)
    except OSError as exc:
        await server.stop(None)
        raise StartupError(
            f"{name} cannot serve its admin endpoint on {admin_host}:{admin_port}: {exc}"
        ) from exc
    for service_name in ("", *names):
        await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    readiness = ReadinessMonitor(
        health=health,
        services=names,
        database=context.database,
        interval_s=float(topology.environ.get("PAYMESH_READINESS_INTERVAL_S", 5.0)),
    )
    await readiness.start()
    public_text = ""
    if public and public_bound is not None:
        public_host = parse_hostport(public, variable=f"{spec.env_prefix}_PUBLIC_ADDR")[0]
        public_text = f"{public_host}:{public_bound}"
    print(
        f"{READY_MARKER} service={name} address={host}:{bound} admin={admin_host}:{admin_bound}"
        + (f" public={public_text}" if public_text else ""),
        flush=True,
    )
    if on_ready is not None:
        on_ready(f"{host}:{bound}")
    if on_public_ready is not None and public_text:
        on_public_ready(public_text)
    log.info(
        "serving %s on %s:%d (%s)%s",
        ", ".join(names),
        host,
        bound,
        "plaintext" if security.plaintext else f"mTLS as {security.spiffe_id}",
        f", merchant-facing TLS on {public_text}" if public_text else "",
    )
    reload_s = float(topology.environ.get("PAYMESH_TLS_RELOAD_S", DEFAULT_TLS_RELOAD_S))
    rotation = asyncio.create_task(_follow_rotation(clients, reload_s))

    loop = asyncio.get_running_loop()
    if stop is None:  # a process of its own: signals stop it
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    rotation.cancel()
    log.info("stopping: health NOT_SERVING, %.1fs grace for calls in flight", grace)
    await readiness.stop()
    await health.enter_graceful_shutdown()
    await server.stop(grace)
    await context.admin.stop()
    await clients.close()
    await diagnostics.close()
    for callback in context.on_stop:
        result = callback()
        if inspect.isawaitable(result):
            await result
    tracer_provider.shutdown()  # flushes the spans still batched for the exporter
    log.info("stopped")


def _listen(
    server: aio.Server,
    name: str,
    address: str,
    security: TransportSecurity,
    *,
    require_client_cert: bool,
) -> int:
    """Bind ``address``: mTLS for the mesh port, server-only TLS for the merchant-facing one."""
    try:
        bound = (
            server.add_insecure_port(address)
            if security.plaintext
            else server.add_secure_port(
                address, security.server_credentials(require_client_cert=require_client_cert)
            )
        )
    except RuntimeError as exc:
        raise StartupError(
            f"{name} cannot listen on {address}: {exc} (is the port taken?)"
        ) from exc
    if bound == 0:
        raise StartupError(f"{name} cannot listen on {address} (is the port taken?)")
    return bound


def _merchant_authenticator(clients: ClientFactory) -> Authenticator:
    """Checks merchant API keys at merchant-auth-service through the policy chain."""
    stub = clients.stub("merchant-auth-service", merchant_auth_pb2_grpc.MerchantAuthServiceStub)

    async def authenticate(secret: str, client_peer: str) -> AuthenticatedMerchant:
        try:
            response = await stub.AuthenticateApiKey(
                merchant_auth_pb2.AuthenticateApiKeyRequest(),
                metadata=((AUTHORIZATION_KEY, f"Bearer {secret}"), (CLIENT_PEER_KEY, client_peer)),
            )
        except aio.AioRpcError as exc:
            raise _refusal(exc) or _unreachable(exc, clients) or exc from None
        return merchant_of(response)

    return authenticate


def _unreachable(exc: aio.AioRpcError, clients: ClientFactory) -> ServiceError | None:
    """merchant-auth not answering (down, circuit open, deadline): UNAVAILABLE with RetryInfo
    (its own, else the breaker's open time left, else a second), so the merchant knows the
    request did nothing and when to send it again. None for merchant-auth's definite answers."""
    if exc.code() not in AUTH_UNREACHABLE_CODES:
        return None
    status = status_from_metadata(
        exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ())
    )
    info = error_info(status)
    local = ("CIRCUIT_OPEN", "CONCURRENCY_LIMITED")  # refused by our own chain, nothing sent
    reason = info.reason if info and info.reason in local else "DOWNSTREAM_UNAVAILABLE"
    open_left = clients.chain.breakers.get("merchant-auth-service").readout().open_left_s
    return Unavailable(
        f"merchant-auth-service could not check the API key ({exc.details()}); nothing was done",
        reason=reason,
        retry_delay_s=retry_delay_of(status) or open_left or AUTH_UNREACHABLE_RETRY_S,
        metadata={"target": "merchant-auth-service"},
    )


def _refusal(exc: aio.AioRpcError) -> ServiceError | None:
    """merchant-auth's verdict on a key, to pass on to the merchant as it is: a wrong key is
    UNAUTHENTICATED, too many failures or an overloaded verifier RESOURCE_EXHAUSTED with its
    RetryInfo. None for anything else, which is merchant-auth failing (UNAVAILABLE upstream)."""
    code = exc.code()
    if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return None
    trailing = tuple(exc.trailing_metadata() or ())
    status = status_from_metadata(code, exc.details() or "", trailing)
    info = error_info(status)
    kind = Unauthenticated if code == grpc.StatusCode.UNAUTHENTICATED else ResourceExhausted
    return kind(
        status.message or exc.details() or code.name,
        reason=info.reason if info else None,
        metadata=dict(info.metadata) if info else None,
        retry_delay_s=retry_delay_of(status),
    )


async def _follow_rotation(clients: ClientFactory, interval_s: float) -> None:
    """Rebuild client channels whenever this service's certificate was rotated."""
    while True:
        await asyncio.sleep(interval_s)
        clients.rotate_if_changed()


def die_with_supervisor() -> None:
    """When started by the launcher, get SIGTERM if it dies (Linux PDEATHSIG), so no orphan
    outlives ``make run`` however it ends."""
    supervisor = os.environ.get("PAYMESH_SUPERVISED")
    if not supervisor or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if str(os.getppid()) != supervisor:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def run(name: str, build: Builder) -> None:
    """Entry point of ``python -m services.<name>``: serve, exit 0 on a clean stop."""
    die_with_supervisor()
    configure_logging(name)
    try:
        asyncio.run(serve(name, build))
    except StartupError as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(0)
