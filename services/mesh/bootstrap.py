"""One start-up for every service: gRPC aio server, health, reflection, signals, graceful stop.

A service's ``__main__`` calls :func:`run` with its topology name and a builder that returns
its servicers; :func:`serve` is the steps, each a function below: load the configuration,
connect (identity, tracing, client chain), build the servicers, make the server, register
(servicers, Diagnostics, health, reflection), listen, start the admin endpoint, go serving,
wait for the stop, drain. What a servicer serves is found from the topology's generated
module, never typed in the service.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import inspect
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from interceptors.chain import build_client_chain
from interceptors.codes import NO_VERDICT
from interceptors.errors import (
    CallError,
    Reason,
    ResourceExhaustedError,
    UnauthenticatedError,
    known_reason,
    retry_delay_of,
)
from interceptors.policy import PolicyConfig, PolicyError
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc
from paymesh.mesh.v1 import mesh_pb2_grpc
from services.mesh import logs, page_tokens, reflection
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
    READINESS_INTERVAL_S,
    DiagnosticsServicer,
    ReadinessMonitor,
    healthz_max_lag_s,
    process_health,
)
from services.mesh.errors import ResourceExhausted, ServiceError, Unauthenticated, Unavailable
from services.mesh.faults import Fault, FaultInjector
from services.mesh.limits import LimitsError, ServerLimits
from services.mesh.metrics import ServiceMetrics
from services.mesh.page_tokens import PageTokenKeyError
from services.mesh.recent import RecentCalls
from services.mesh.server import ServerPolicyInterceptor
from services.mesh.tls import TlsConfigError, TransportSecurity
from services.mesh.topology import (
    ServiceSpec,
    Target,
    Topology,
    TopologyError,
    env_prefix,
    generated_module,
    parse_hostport,
)
from services.mesh.tracing import (
    records_spans,
    sampler,
    server_tracing,
    service_tracer_provider,
)
from services.storage import idempotency, leases, sql
from services.storage.shared_state import SharedState, SharedStateError

log = logging.getLogger("paymesh.bootstrap")

#: Printed on stdout once serving, so a supervisor can learn an ephemeral port.
READY_MARKER = "PAYMESH_READY"
DEFAULT_GRACE_S = 5.0
#: How often a service looks for a rotated certificate of its own (``PAYMESH_TLS_RELOAD_S``).
DEFAULT_TLS_RELOAD_S = 30.0
_PR_SET_PDEATHSIG = 1
#: Exit code of a start-up that failed on configuration (bad override, taken port, ...).
EXIT_CONFIG = 2
#: merchant-auth failures that say it could not answer (not a verdict on the key).
AUTH_UNREACHABLE_CODES = NO_VERDICT
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
    database: sql.Target | None = None
    """The SQLite file or PostgreSQL URL, once the builder asked for it; its readiness is the
    service's."""
    shared: SharedState | None = None
    """The Redis state (``REDIS_URL``), once the builder asked for it; health lists it."""
    prechecks: dict[str, Callable[[], None]] = field(default_factory=dict)
    """Per full method path (``/pkg.Service/Method``), a check the server runs before the
    gate admits a call: it raises a ServiceError to refuse at once (fail fast before any
    authentication or work); it must not block."""

    @property
    def var_dir(self) -> Path:
        """Directory for the service's files: ``PAYMESH_VAR_DIR`` or ``var/``."""
        return Path(self.environ.get("PAYMESH_VAR_DIR", "var"))

    def database_path(self) -> sql.Target:
        """Where the service's database is (:func:`database_target`); readiness follows it.

        Raises:
            StartupError: a URL of another scheme, or a bad schema name.
        """
        target = database_target(self.name, self.environ)
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
        self.database = target
        return target

    def shared_state(self) -> SharedState | None:
        """Redis shared by the service's replicas (``REDIS_URL``), or None: stay in-process."""
        if self.shared is None:
            try:
                self.shared = SharedState.from_environ(self.environ)
            except SharedStateError as exc:
                raise StartupError(str(exc)) from None
            if self.shared is not None:
                self.on_stop.append(self.shared.close)
        return self.shared


def database_target(name: str, environ: Mapping[str, str]) -> sql.Target:
    """Where service ``name``'s database is: a SQLite file or a PostgreSQL URL.

    ``<PREFIX>_DATABASE_URL`` (``sqlite:///path`` or ``postgresql://...``), else the shared
    ``DATABASE_URL`` (PostgreSQL only, one schema per service), else
    ``$PAYMESH_VAR_DIR/<name>.db`` (``var/``). A PostgreSQL URL without ``?schema=`` gets the
    service's own schema: its name with ``_`` for ``-``.

    Raises:
        StartupError: a URL of another scheme, or a bad schema name.
    """
    var = f"{env_prefix(name)}_DATABASE_URL"
    url = environ.get(var)
    if url is None and environ.get(SHARED_DATABASE_VAR):
        var, url = SHARED_DATABASE_VAR, environ[SHARED_DATABASE_VAR]
        if not url.startswith(sql.POSTGRES_SCHEMES):
            raise StartupError(
                f"{var}={url!r}: must be a postgresql:// URL (one schema per service);"
                f" a SQLite file is set per service with {env_prefix(name)}_DATABASE_URL"
            )
    if url is None:
        return Path(environ.get("PAYMESH_VAR_DIR", "var")) / f"{name}.db"
    try:
        return sql.target_of_url(url, schema=name.replace("-", "_"))
    except sql.UnsupportedDatabaseUrl as exc:
        raise StartupError(f"{var}={exc}") from None


#: One PostgreSQL database for every service, each in its own schema (``<SERVICE>_DATABASE_URL``
#: wins where set).
SHARED_DATABASE_VAR = "DATABASE_URL"


#: What a builder returns: its servicers (each matched to the proto service whose generated
#: ``XxxServicer`` base it extends), or Registrations for anything else it serves.
Served = Sequence[object]
Builder = Callable[[ServiceContext], Served | Awaitable[Served]]


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

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]
    ) -> None:
        """The library's Watch, except that in a graceful stop the stream ends (status OK) once
        it has carried NOT_SERVING. The library's stream waits for a change that can no longer
        come, so the stop left the handler pending until the event loop closed and cancelled it,
        which grpc.aio logs as an unhandled CancelledError with a traceback."""
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last: int | None = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    # The library raises its flag before it turns each status: a watcher woken
                    # in between must still wait for (and carry) NOT_SERVING. A service the stop
                    # will not turn (unknown here) ends at once.
                    if self._gracefully_shutting_down and (
                        last == health_pb2.HealthCheckResponse.NOT_SERVING
                        or service not in self._server_status
                    ):
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]


@dataclass(frozen=True, slots=True, kw_only=True)
class StartConfig:
    """Everything a service reads from its environment at start, checked before anything runs."""

    name: str
    """Mesh name of the service."""
    topology: Topology
    """The validated topology, overrides applied."""
    spec: ServiceSpec
    """The service's own entry."""
    host: str
    """Host of the mesh port (mTLS)."""
    port: int
    """Mesh port to bind; 0 for any free one."""
    public: str | None
    """``host:port`` of the merchant-facing port, None when it has none."""
    admin_host: str
    """Host of the admin HTTP endpoint."""
    admin_port: int
    """Admin port to bind; 0 for any free one."""
    health: tuple[str, int] | None
    """Host and port of the plaintext health-only port (``<NAME>_HEALTH_ADDR``), None if off."""
    limits: ServerLimits
    """Server limits (``<NAME>_MAX_*``)."""
    security: TransportSecurity
    """The service's identity: its certificate, or plaintext in development."""
    policy: PolicyConfig
    """Policy of every outgoing call."""
    grace_s: float
    """Time calls in flight get on stop (``PAYMESH_GRACE_S``)."""
    tls_reload_s: float
    """How often to look for a rotated certificate (``PAYMESH_TLS_RELOAD_S``)."""
    readiness_interval_s: float
    """How often readiness checks the database (``PAYMESH_READINESS_INTERVAL_S``)."""
    reflection: bool
    """Whether reflection is served (``PAYMESH_REFLECTION``, off with ``0``)."""
    control: ControlAccess
    """The gate in front of ``/faults``."""
    healthz_max_lag_s: float
    """Event-loop lag at which ``/healthz`` answers 503."""
    access_log_sample: float
    """Fraction of successful calls logged at INFO (``PAYMESH_ACCESS_LOG_SAMPLE``)."""


def seconds_var(
    environ: Mapping[str, str], var: str, default: float, *, allow_zero: bool = False
) -> float:
    """A positive (with ``allow_zero``: zero or more) number of seconds from ``var``, else
    ``default``.

    Raises:
        StartupError: it is set but not such a finite number (the message names it).
    """
    raw = environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not ((value >= 0 if allow_zero else value > 0) and math.isfinite(value)):
        wanted = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
        raise StartupError(f"{var}={raw!r} is not {wanted} (default {default:g})")
    return value


def load_config(
    name: str,
    topology: Topology | None = None,
    *,
    policy: PolicyConfig | None = None,
    grace_s: float | None = None,
) -> StartConfig:
    """Step 1: read and check every setting of the service; nothing is started yet.

    Raises:
        StartupError: a variable is invalid; the message names it, its value and what is allowed.
    """
    try:
        topology = topology or Topology()
        spec = topology.service(name)
        environ = topology.environ
        host, port = topology.bind_address(name)
        admin_host, admin_port = parse_hostport(
            topology.admin_address(name), variable=f"{spec.env_prefix}_ADMIN_ADDR"
        )
        config = StartConfig(
            name=name,
            topology=topology,
            spec=spec,
            host=host,
            port=port,
            public=topology.public_address(name),
            admin_host=admin_host,
            admin_port=admin_port,
            health=topology.health_address(name),
            limits=ServerLimits.from_environ(spec.env_prefix, environ),
            security=TransportSecurity.from_environ(name, environ),
            policy=policy or _load_policy(topology),
            grace_s=grace_s if grace_s is not None else _grace_s(environ),
            tls_reload_s=seconds_var(environ, "PAYMESH_TLS_RELOAD_S", DEFAULT_TLS_RELOAD_S),
            readiness_interval_s=seconds_var(
                environ, "PAYMESH_READINESS_INTERVAL_S", READINESS_INTERVAL_S
            ),
            reflection=_reflection_on(environ),
            control=ControlAccess.from_environ(environ),
            healthz_max_lag_s=healthz_max_lag_s(environ),
            access_log_sample=logs.access_log_sample(environ),
        )
        # Read now, so a bad key file, retention or sampler stops start-up, not a first call.
        page_tokens.process_codec()
        sampler(environ)
        idempotency.default_retention()
        leases.default_lease_s()
    except (
        TopologyError,
        LimitsError,
        TlsConfigError,
        PageTokenKeyError,
        AdminTokenError,
        ValueError,
    ) as exc:
        raise StartupError(str(exc)) from exc
    if config.security.plaintext:
        log.warning(
            "PAYMESH_INSECURE is set: %s serves PLAINTEXT, without TLS, identities or "
            "authorization of mesh callers; never do this outside a development machine",
            name,
        )
    if config.control.enabled:
        log.warning("fault injection is ON: /faults on the admin port takes the admin token")
    return config


def _load_policy(topology: Topology) -> PolicyConfig:
    targets = {s.name for s in topology.services} | {p.name for p in topology.partners}
    path = topology.environ.get("PAYMESH_POLICY_FILE")
    try:
        return PolicyConfig.load(path, known_targets=targets)
    except PolicyError as exc:
        named = f"PAYMESH_POLICY_FILE={path!r}: " if path else ""
        raise StartupError(f"{named}bad policy configuration: {exc}") from exc


def _reflection_on(environ: Mapping[str, str]) -> bool:
    """``PAYMESH_REFLECTION``: ``0`` switches reflection off, ``1`` (the default) on."""
    raw = environ.get("PAYMESH_REFLECTION", "")
    value = raw.strip() or "1"
    if value not in ("0", "1"):
        raise StartupError(f"PAYMESH_REFLECTION={raw!r} is not 0 (off) or 1 (on, the default)")
    return value == "1"


def _grace_s(environ: Mapping[str, str]) -> float:
    """``PAYMESH_GRACE_S``: zero or more seconds (zero cancels calls in flight at once)."""
    return seconds_var(environ, "PAYMESH_GRACE_S", DEFAULT_GRACE_S, allow_zero=True)


@dataclass(slots=True, kw_only=True)
class _Runtime:
    """What the steps after configuration share: the context, tracing and observation."""

    config: StartConfig
    context: ServiceContext
    tracer_provider: TracerProvider
    recording: bool
    """Whether anyone receives the service's spans (an exporter, a test's processor)."""
    metrics: ServiceMetrics
    recent: RecentCalls


def connect(config: StartConfig, span_processors: Sequence[SpanProcessor]) -> _Runtime:
    """Step 2: tracing, the client policy chain and the client factory under the service's
    identity, and the context its builder gets."""
    name, environ = config.name, config.topology.environ
    tracer_provider = service_tracer_provider(name, environ, span_processors=span_processors)
    recording = records_spans(environ, span_processors=span_processors)
    chain = build_client_chain(
        caller=name, config=config.policy, tracer_provider=tracer_provider, trace_calls=recording
    )
    clients = ClientFactory(
        caller=name, topology=config.topology, chain=chain, security=config.security
    )
    context = ServiceContext(
        name=name, topology=config.topology, clients=clients, environ=dict(environ)
    )
    metrics, recent = ServiceMetrics(service=name), RecentCalls()
    spec = config.spec
    metrics.follow_chain(chain.telemetry, chain.breakers.states, (*spec.calls, *spec.partners))
    recent.follow(chain.telemetry)
    return _Runtime(
        config=config,
        context=context,
        tracer_provider=tracer_provider,
        recording=recording,
        metrics=metrics,
        recent=recent,
    )


async def build_servicers(build: Builder, context: ServiceContext) -> list[Registration]:
    """Step 3: run the service's builder and turn its servicers into registrations."""
    built = build(context)
    served = await built if inspect.isawaitable(built) else built
    return registrations_for(context.topology.service(context.name), served)


def registrations_for(spec: ServiceSpec, served: Served) -> list[Registration]:
    """Each servicer matched to the service of ``spec``'s generated module it implements.

    The generated ``<module>_grpc`` has, per proto service ``X``, the base ``XServicer`` and
    ``add_XServicer_to_server``; the full name for health and reflection is the descriptor's.

    Raises:
        StartupError: a servicer implements none of them, or one the topology declares is
            not served.
    """
    module = generated_module(spec.proto)
    stubs = generated_module(f"{spec.proto}_grpc")
    registrations: list[Registration] = []
    for item in served:
        if isinstance(item, Registration):
            registrations.append(item)
            continue
        for service in module.DESCRIPTOR.services_by_name.values():
            if isinstance(item, getattr(stubs, f"{service.name}Servicer")):
                add = getattr(stubs, f"add_{service.name}Servicer_to_server")
                registrations.append(
                    Registration(servicer=item, add_to_server=add, service_name=service.full_name)
                )
                break
        else:
            raise StartupError(
                f"{spec.name}: {type(item).__name__} implements no service of {spec.proto} "
                f"({', '.join(spec.proto_services)}); extend its generated XxxServicer base"
            )
    missing = set(spec.proto_services) - {r.service_name for r in registrations}
    if missing:
        raise StartupError(f"{spec.name} must serve {sorted(missing)} as the topology declares")
    return registrations


def make_server(runtime: _Runtime) -> tuple[aio.Server, ServerPolicyInterceptor]:
    """Step 4: the aio server and the policy its handlers are registered behind (admission,
    the gate, faults, metrics, access log, trace context); spans, when recorded, come from
    the tracing interceptors around it. The policy is on the handlers, not an interceptor: a
    grpc.aio interceptor costs an await and a new handler per call."""
    config, context, metrics = runtime.config, runtime.context, runtime.metrics
    gate = CallGate(
        service=config.name,
        topology=config.topology,
        spiffe_id_of=config.security.spiffe_id_of,
        authenticate=(
            _merchant_authenticator(context.clients) if config.spec.merchant_methods else None
        ),
        reflection=config.reflection,
        plaintext=config.security.plaintext,
    )
    tracing, trace_context = server_tracing(runtime.tracer_provider, recording=runtime.recording)
    policy = ServerPolicyInterceptor(
        domain=config.name,
        faults=context.faults,
        observers=(metrics.observe_server,),
        gate=gate,
        max_in_flight=config.limits.max_in_flight,
        on_shed=metrics.count_shed,
        prechecks=context.prechecks,
        access_log_sample=config.access_log_sample,
        trace_context=trace_context,
    )
    server = aio.server(
        interceptors=tracing,  # around the handlers: the policy's work is in the span
        # A taken port must be an error, never a silent second listener.
        options=[("grpc.so_reuseport", 0), *config.limits.grpc_options()],
    )
    return server, policy


def register(
    server: aio.Server,
    runtime: _Runtime,
    registrations: Sequence[Registration],
    policy: ServerPolicyInterceptor,
) -> tuple[MeshHealthServicer, DiagnosticsServicer]:
    """Step 5: the service's servicers, Diagnostics, health and reflection on ``server``,
    each behind ``policy``."""
    config, context = runtime.config, runtime.context
    target: Any = policy.registering_on(server)  # stands for the server while registering
    for registration in registrations:
        registration.add_to_server(registration.servicer, target)
    chain = context.clients.chain
    diagnostics = DiagnosticsServicer(
        spec=config.spec,
        topology=config.topology,
        breaker_states=chain.breakers.states,
        recent=runtime.recent,
        database=context.database,
        shared=context.shared,
        open_channel=lambda target, address: config.security.aio_channel(
            target, address, options=chain.channel_options()
        ),
    )
    mesh_pb2_grpc.add_DiagnosticsServiceServicer_to_server(diagnostics, target)
    health = MeshHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, target)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    names = [r.service_name for r in registrations]
    reflection.add_to_server(target, (*names, DIAGNOSTICS_SERVICE, health_name))
    return health, diagnostics


async def listen(server: aio.Server, config: StartConfig) -> tuple[int, str]:
    """Step 6: bind the mesh port (mTLS) and the merchant-facing one (TLS), then start.

    Returns:
        The bound mesh port and the bound ``host:port`` of the public one ("" if none).
    """
    address = f"{config.host}:{config.port}"
    bound = _listen(server, config.name, address, config.security, require_client_cert=True)
    public_text = ""
    if config.public:
        public_bound = _listen(
            server, config.name, config.public, config.security, require_client_cert=False
        )
        public_host = parse_hostport(
            config.public, variable=f"{config.spec.env_prefix}_PUBLIC_ADDR"
        )[0]
        public_text = f"{public_host}:{public_bound}"
    await server.start()
    return bound, public_text


async def start_admin(server: aio.Server, runtime: _Runtime) -> int:
    """Step 7: the admin HTTP endpoint (``/metrics``, ``/healthz``, ``/breakers``, ``/faults``
    and the service's own routes); returns its bound port."""
    config, context = runtime.config, runtime.context
    _admin_routes(context, config)
    context.admin.route("GET", "/metrics", runtime.metrics.handle)
    admin_host, admin_port = config.admin_host, config.admin_port
    try:
        admin_bound = await context.admin.start(admin_host, admin_port)
    except OSError as exc:
        await server.stop(None)
        raise StartupError(
            f"{config.name} cannot serve its admin endpoint on {admin_host}:{admin_port}: {exc}"
        ) from exc
    return admin_bound


async def stop_admin(context: ServiceContext) -> None:
    """Stop the admin HTTP endpoint."""
    await context.admin.stop()


async def go_serving(
    health: MeshHealthServicer, runtime: _Runtime, names: Sequence[str]
) -> ReadinessMonitor:
    """Step 8: health SERVING for the process and each service; readiness follows the database."""
    for service_name in ("", *names):
        await health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    readiness = ReadinessMonitor(
        health=health,
        services=names,
        database=runtime.context.database,
        interval_s=runtime.config.readiness_interval_s,
        shared=runtime.context.shared,
    )
    await readiness.start()
    return readiness


async def start_health_port(
    health: MeshHealthServicer, config: StartConfig
) -> tuple[aio.Server | None, str]:
    """Step 5b: the plaintext health-only port, when ``<NAME>_HEALTH_ADDR`` asks for it; the
    server and its bound ``host:port`` (None and "" when off).

    kubelet's gRPC probe cannot do TLS, so it probes here: the same health servicer as the
    mesh port (so readiness and the drain's NOT_SERVING show), no other service, no reflection.
    """
    if config.health is None:
        return None, ""
    host, port = config.health
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        variable = f"{config.spec.env_prefix}_HEALTH_ADDR"
        raise StartupError(f"{variable}={host}:{port}: cannot listen there (is the port taken?)")
    await server.start()
    return server, f"{host}:{bound}"


def announce(
    config: StartConfig, names: Sequence[str], bound: int, public: str, admin: int, health: str = ""
) -> None:
    """The ready line on stdout (a supervisor learns the ports from it) and the log line."""
    address = f"{config.host}:{bound}"
    print(
        f"{READY_MARKER} service={config.name} address={address} "
        f"admin={config.admin_host}:{admin}"
        + (f" public={public}" if public else "")
        + (f" health={health}" if health else ""),
        flush=True,
    )
    security = config.security
    log.info(
        "serving %s on %s (%s)%s",
        ", ".join(names),
        address,
        "plaintext" if security.plaintext else f"mTLS as {security.spiffe_id}",
        f", merchant-facing TLS on {public}" if public else "",
    )


async def wait_for_stop(stop: asyncio.Event | None) -> None:
    """Step 9: wait for ``stop``, or for SIGTERM/SIGINT when the process is the service."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


#: How long a stop waits for grpc.aio's own tasks of calls already ended to finish.
RPC_SETTLE_S = 1.0
#: A stop's tasks end within a few turns of the loop; once none has ended for this long, what
#: is left belongs to something still serving (another server of the process, as in tests).
RPC_SETTLE_QUIET_S = 0.1
#: Names of the coroutines grpc.aio's server runs each call in.
_RPC_TASK_NAMES = frozenset({"_schedule_rpc_coro", "_handle_exceptions"})


async def settle_rpc_tasks(timeout_s: float, *, quiet_s: float = RPC_SETTLE_QUIET_S) -> None:
    """Wait up to ``timeout_s`` for grpc.aio's tasks of the calls the stopped server ended.

    A call's task outlives ``server.stop`` until the core confirms the call closed (a health
    watcher that cancelled as the stop began is one). Left pending, the closing event loop
    cancels it and grpc.aio writes a traceback to the log although nothing failed. The tasks
    cannot be told apart by server, so the wait also ends once ``quiet_s`` passes with none
    ending: the rest are calls of a server that still serves, which this stop must not wait on.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__name__", "") in _RPC_TASK_NAMES
    }
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            return
        done, pending = await asyncio.wait(
            pending, timeout=min(quiet_s, left), return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            return


async def drain(
    server: aio.Server,
    runtime: _Runtime,
    *,
    health: MeshHealthServicer,
    readiness: ReadinessMonitor,
    diagnostics: DiagnosticsServicer,
    health_port: aio.Server | None = None,
) -> None:
    """Step 10: health NOT_SERVING, calls in flight get the grace period, then everything the
    service opened is closed in order (the health-only port, which showed NOT_SERVING through
    the grace period, admin, clients, the builder's ``on_stop``, tracing)."""
    context = runtime.context
    log.info(
        "stopping: health NOT_SERVING, %.1fs grace for calls in flight", runtime.config.grace_s
    )
    await readiness.stop()
    await health.enter_graceful_shutdown()
    await server.stop(runtime.config.grace_s)
    if health_port is not None:
        await health_port.stop(None)
    await settle_rpc_tasks(RPC_SETTLE_S)
    await stop_admin(context)
    await context.clients.close()
    await diagnostics.close()
    for callback in context.on_stop:
        result = callback()
        if inspect.isawaitable(result):
            await result
    runtime.tracer_provider.shutdown()  # flushes the spans still batched for the exporter
    log.info("stopped")


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
    config = load_config(name, topology, policy=policy, grace_s=grace_s)
    runtime = connect(config, span_processors)
    registrations = await build_servicers(build, runtime.context)
    names = [r.service_name for r in registrations]
    server, server_policy = make_server(runtime)
    health, diagnostics = register(server, runtime, registrations, server_policy)
    # Before the mesh port, so a taken health port stops start-up with nothing yet listening;
    # until go_serving it answers NOT_FOUND, which a probe counts as not ready.
    health_port, health_bound = await start_health_port(health, config)
    try:
        bound, public = await listen(server, config)
        admin_bound = await start_admin(server, runtime)
    except StartupError:
        if health_port is not None:
            await health_port.stop(None)
        raise
    readiness = await go_serving(health, runtime, names)
    announce(config, names, bound, public, admin_bound, health_bound)
    if on_ready is not None:
        on_ready(f"{config.host}:{bound}")
    if on_public_ready is not None and public:
        on_public_ready(public)
    rotation = asyncio.create_task(_follow_rotation(runtime.context.clients, config.tls_reload_s))
    await wait_for_stop(stop)
    rotation.cancel()
    await drain(
        server,
        runtime,
        health=health,
        readiness=readiness,
        diagnostics=diagnostics,
        health_port=health_port,
    )


def _admin_routes(context: ServiceContext, config: StartConfig) -> None:
    """``/healthz`` (event loop lag, database ``SELECT 1``; 503 naming what failed) and
    ``/breakers`` (the chain's breaker and budget states), open to read,
    and ``/faults`` (GET the faults, PUT a JSON list of faults, DELETE them) behind the
    control gate: refused unless ``PAYMESH_FAULT_INJECTION=1``, then only with the admin token.
    """
    access, max_lag_s = config.control, config.healthz_max_lag_s

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


#: Names ``PAYMESH_LOG_LEVEL`` may take.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(environ: Mapping[str, str]) -> str:
    """``PAYMESH_LOG_LEVEL`` (any case), default INFO.

    Raises:
        StartupError: it names no log level.
    """
    raw = environ.get("PAYMESH_LOG_LEVEL", "")
    level = raw.strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise StartupError(
            f"PAYMESH_LOG_LEVEL={raw!r} is not a log level; one of {', '.join(LOG_LEVELS)}"
        )
    return level


def configure_logging(name: str, environ: Mapping[str, str] | None = None) -> None:
    """One line per record, naming the service and trace; level from ``PAYMESH_LOG_LEVEL``,
    text or JSON from ``PAYMESH_LOG_FORMAT`` (``services.mesh.logs``).

    Raises:
        StartupError: ``PAYMESH_LOG_LEVEL`` or ``PAYMESH_LOG_FORMAT`` names nothing known.
    """
    environ = os.environ if environ is None else environ
    try:
        logs.configure(name, environ, level=log_level(environ))
    except logs.LogConfigError as exc:
        raise StartupError(str(exc)) from exc


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
    stub = clients.stub(Target.MERCHANT_AUTH, merchant_auth_pb2_grpc.MerchantAuthServiceStub)

    async def authenticate(secret: str, client_peer: str) -> AuthenticatedMerchant:
        try:
            response = await stub.AuthenticateApiKey(
                merchant_auth_pb2.AuthenticateApiKeyRequest(),
                metadata=((AUTHORIZATION_KEY, f"Bearer {secret}"), (CLIENT_PEER_KEY, client_peer)),
            )
        except CallError as exc:
            raise _refusal(exc) or _unreachable(exc, clients) or exc from None
        return merchant_of(response)

    return authenticate


def _unreachable(exc: CallError, clients: ClientFactory) -> ServiceError | None:
    """merchant-auth not answering (down, circuit open, deadline): UNAVAILABLE with RetryInfo
    (its own, else the breaker's open time left, else a second), so the merchant knows the
    request did nothing and when to send it again. None for merchant-auth's definite answers."""
    if exc.code().name not in AUTH_UNREACHABLE_CODES:
        return None
    status = exc.status
    local = (Reason.CIRCUIT_OPEN, Reason.CONCURRENCY_LIMITED)  # refused by our chain: not sent
    reason = Reason(exc.reason) if exc.reason in local else Reason.DOWNSTREAM_UNAVAILABLE
    open_left = clients.chain.breakers.get(Target.MERCHANT_AUTH).readout().open_left_s
    return Unavailable(
        f"merchant-auth-service could not check the API key ({exc.details()}); nothing was done",
        reason=reason,
        retry_delay_s=retry_delay_of(status) or open_left or AUTH_UNREACHABLE_RETRY_S,
        metadata={"target": Target.MERCHANT_AUTH},
    )


def _refusal(exc: CallError) -> ServiceError | None:
    """merchant-auth's verdict on a key, to pass on to the merchant as it is: a wrong key is
    UNAUTHENTICATED, too many failures or an overloaded verifier RESOURCE_EXHAUSTED with its
    RetryInfo. None for anything else, which is merchant-auth failing (UNAVAILABLE upstream)."""
    if not isinstance(exc, UnauthenticatedError | ResourceExhaustedError):
        return None
    kind = Unauthenticated if isinstance(exc, UnauthenticatedError) else ResourceExhausted
    return kind(
        exc.status.message or exc.details() or exc.code().name,
        reason=known_reason(exc.reason, exc.code()) if exc.reason else None,
        metadata=exc.metadata or None,
        retry_delay_s=exc.retry_delay_s,
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


class HttpMember(Protocol):
    """An HTTP server the launcher runs as a member of the mesh (the sandbox, the console)."""

    async def start(self, host: str, port: int) -> int: ...

    async def stop(self) -> None: ...


async def serve_http_member(name: str, server: HttpMember, host: str, port: int) -> int:
    """Serve ``server`` on ``host:port`` until SIGTERM/SIGINT, with the ready line a supervisor
    reads; the exit status: 0 after a clean stop, 2 when it cannot listen."""
    try:
        bound = await server.start(host, port)
    except OSError as exc:
        print(f"{name}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"{READY_MARKER} service={name} address={host}:{bound}", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def freeze_startup_heap() -> None:
    """Move what start-up left alive out of the collector's reach (``gc.freeze``).

    Modules, descriptors, servicers and clients live as long as the process; frozen after a
    collection, they are no longer rescanned by every full collection a payment may meet.
    """
    gc.collect()
    gc.freeze()


def _started(address: str) -> None:
    freeze_startup_heap()


def run(name: str, build: Builder) -> None:
    """Entry point of ``python -m services.<name>``: serve, exit 0 on a clean stop, exit
    ``EXIT_CONFIG`` with one line naming the problem when the configuration is bad.

    Once serving, the start-up heap is frozen (:func:`freeze_startup_heap`).
    """
    die_with_supervisor()
    try:
        configure_logging(name)
        asyncio.run(serve(name, build, on_ready=_started))
    except StartupError as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except sql.DatabaseError as exc:
        # A database that is down or refuses us at start (a PostgreSQL server not up yet):
        # one line, and a plain failure the supervisor restarts with backoff.
        print(
            f"{name}: cannot start: its database: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    sys.exit(0)
