"""Runs the whole mesh on one machine: one process per service, health-gated, stopped cleanly.

``make run`` runs it (``python -m services.tools.launcher``) and keeps every
member running with a
:class:`~services.tools.supervisor.Supervisor` (restart with backoff, crash loops said loudly, the
state in ``<var>/launcher.json``); the integration and chaos tests use :class:`Mesh` directly
with :func:`ephemeral_environ` so they never collide with a running ``make run``. Children die
with the launcher (see ``die_with_supervisor``), so no orphan outlives it. ``--replicas
payment-gateway=2`` (or ``PAYMESH_REPLICAS``) runs several processes of a service
(:mod:`services.tools.replicas`); local engines (a database, a cache) plug in as
:class:`LocalEngine` whose URLs reach every member as plain environment.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh import logs, pki, tls
from services.mesh.admin_token import with_admin_token
from services.mesh.topology import (
    CONSOLE_VAR,
    DEFAULT_REPLICA_PORT_STEP,
    LOCAL_POSTGRESQL_PORT,
    LOCAL_REDIS_PORT,
    LOOPBACK,
    PARTNER_SANDBOX_VAR,
    REPLICA_PORT_STEP_VAR,
    SERVICES,
    Topology,
    parse_hostport,
    replica_port_step,
)
from services.tools import postgres, redis_server
from services.tools import replicas as replica_plan
from services.tools.ports import DEFAULT_TIME_WAIT_WAIT_S, PortsUnavailable, wait_until_bindable
from services.tools.ports import free_port as free_port  # re-exported: tests and tools use it here
from services.tools.ports import port_is_free as port_is_free
from services.tools.supervisor import (
    HEARTBEAT_S,
    LAUNCHER_FILE,
    Change,
    RestartPolicy,
    RestartPolicyError,
    Supervisor,
    remove_report,
    write_report,
)

SANDBOX = "partner-sandbox"
SANDBOX_MODULE = "services.tools.sandbox"
CONSOLE = "mesh-console"
CONSOLE_MODULE = "services.tools.console"
#: Members that are no mesh service: each answers ``GET /healthz`` with its name.
HTTP_MEMBERS = frozenset({SANDBOX, CONSOLE})
#: Tells a child that a supervisor started it, so it dies with that supervisor.
SUPERVISED_VAR = "PAYMESH_SUPERVISED"
#: How often ``make run`` renews development certificates that near their expiry.
RENEW_INTERVAL_S = 3600.0
#: How often ``make run`` looks at its members (exits, restarts due, restarted ones serving).
SUPERVISE_INTERVAL_S = 0.2


class MeshError(RuntimeError):
    """The mesh could not start; the message names the service and the cause."""


def ephemeral_environ(
    base: Mapping[str, str] | None = None, *, replicas: Mapping[str, int] | None = None
) -> dict[str, str]:
    """``base`` plus address overrides that put every service and partner on free ports;
    for a service with ``replicas``, ports whose replica shifts are free too."""
    environ = dict(os.environ if base is None else base)
    step = replica_port_step(environ)
    taken: set[int] = set()  # every port handed out here, a replica's shifted ones too

    def port_for(service: str) -> int:
        count = (replicas or {}).get(service, 1)
        while True:
            port = free_port()
            ports = [port + k * step for k in range(count)]
            if taken.isdisjoint(ports) and all(
                port_is_free(f"{LOOPBACK}:{p}", variable=service) for p in ports[1:]
            ):
                taken.update(ports)
                return port

    for spec in SERVICES:
        environ[spec.addr_var] = f"{LOOPBACK}:{port_for(spec.name)}"
        environ[f"{spec.env_prefix}_ADMIN_ADDR"] = f"{LOOPBACK}:{port_for(spec.name)}"
        if spec.public_port is not None:
            environ[f"{spec.env_prefix}_PUBLIC_ADDR"] = f"{LOOPBACK}:{port_for(spec.name)}"
    environ[PARTNER_SANDBOX_VAR] = f"{LOOPBACK}:{port_for(SANDBOX)}"
    environ[CONSOLE_VAR] = f"{LOOPBACK}:{port_for(CONSOLE)}"
    return environ


@dataclass(slots=True)
class Member:
    """One running process of the mesh."""

    name: str
    """Mesh name (a service, or the partner sandbox)."""
    module: str
    """Module run with ``python -m``."""
    address: str
    """``host:port`` it serves on."""
    log_path: Path
    """File that receives its stdout and stderr."""
    public_address: str = ""
    """``host:port`` of its merchant-facing TLS port, empty when it has none."""
    service: str = ""
    """The mesh service it is a replica of (its certificate's name); empty for the others."""
    environ: dict[str, str] | None = None
    """Its own overrides of the mesh's environment (a replica's addresses)."""
    process: subprocess.Popen[bytes] | None = None
    """The process, once started."""
    started_at: float | None = None
    """When that process was started (``time.monotonic()``)."""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the member's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


#: The engines ``--engines`` may name when the flag is not given (``postgresql,redis``).
ENGINES_VAR = "PAYMESH_LOCAL_ENGINES"
LOCAL_ENGINE_NAMES = ("postgresql", "redis")


class LocalEngine(Protocol):
    """A server the mesh needs (PostgreSQL, Redis) run by the launcher as its own process."""

    name: str

    def start(self) -> Mapping[str, str]:
        """Start it and wait until it serves; returns the environment that points at it
        (``DATABASE_URL=...``), given to every member."""
        ...

    def stop(self) -> None:
        """Stop it (after every member stopped)."""
        ...


class Mesh:
    """The eleven services (and the partner sandbox, when present, and the mesh console, when
    asked for) as child processes; ``replicas`` runs several processes of some services,
    ``engines`` start before and stop after the members."""

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        names: Iterable[str] | None = None,
        var_dir: Path | None = None,
        python: str = sys.executable,
        with_sandbox: bool = True,
        with_console: bool = False,
        replicas: Mapping[str, int] | None = None,
        engines: Sequence[LocalEngine] = (),
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.var_dir = Path(var_dir or self.environ.get("PAYMESH_VAR_DIR", "var"))
        self.environ["PAYMESH_VAR_DIR"] = str(self.var_dir)
        # With PAYMESH_FAULT_INJECTION=1: one admin token (var/admin.token, 0600) for every child.
        self.environ = with_admin_token(self.environ, self.var_dir)
        self.engines = list(engines)
        # Replicas are placed from the single addresses; callers then dial all of them.
        self.replicas = replica_plan.plan(
            Topology(environ=self.environ),
            replicas or {},
            replica_port_step(self.environ),
        )
        self.environ.update(replica_plan.callers_environ(self.replicas))
        self.topology = Topology(environ=self.environ)
        self.pki_dir = tls.pki_dir(self.environ)
        self._python = python
        wanted = set(names) if names is not None else {s.name for s in SERVICES}
        log_dir = self.var_dir / "logs"
        self.members: dict[str, Member] = {}
        if with_sandbox and _module_exists(SANDBOX_MODULE):
            self.members[SANDBOX] = Member(
                name=SANDBOX,
                module=SANDBOX_MODULE,
                address=self.topology.sandbox_address(),
                log_path=log_dir / f"{SANDBOX}.log",
            )
        for spec in SERVICES:
            if spec.name not in wanted:
                continue
            for replica in self.replicas.get(spec.name, ()):
                self.members[replica.name] = Member(
                    name=replica.name,
                    module=spec.module,
                    address=replica.address,
                    log_path=log_dir / f"{replica.name}.log",
                    public_address=replica.public_address,
                    service=spec.name,
                    environ=replica.environ(),
                )
            if spec.name not in self.replicas:
                self.members[spec.name] = Member(
                    name=spec.name,
                    module=spec.module,
                    address=self.topology.address(spec.name),
                    log_path=log_dir / f"{spec.name}.log",
                    public_address=self.topology.public_address(spec.name) or "",
                    service=spec.name,
                )
        if with_console:
            # Last: it reads the others, and a page that opens early only shows them starting.
            self.members[CONSOLE] = Member(
                name=CONSOLE,
                module=CONSOLE_MODULE,
                address=self.topology.console_address(),
                log_path=log_dir / f"{CONSOLE}.log",
            )
        self._operator: tls.TransportSecurity | None = None

    @property
    def uses_dev_pki(self) -> bool:
        """Whether this mesh runs on the development PKI under ``pki_dir``."""
        insecure = self.environ.get(tls.INSECURE_VAR, "").strip() == "1"  # as tls reads it
        return not insecure and not self.environ.get(tls.CERT_FILE_VAR)

    def ensure_pki(self) -> list[str]:
        """Create the development CA and every certificate, renew those near expiry.

        Returns the identities (re)issued; nothing to do outside the development PKI.
        """
        if not self.uses_dev_pki:
            return []
        names = [*(s.name for s in SERVICES), pki.OPERATOR]
        return pki.ensure_dev_pki(
            self.pki_dir,
            names,
            trust_domain=self.environ.get(tls.TRUST_DOMAIN_VAR) or pki.DEFAULT_TRUST_DOMAIN,
            namespace=self.environ.get(tls.NAMESPACE_VAR) or pki.DEFAULT_NAMESPACE,
        )

    @property
    def operator(self) -> tls.TransportSecurity:
        """The operator identity the launcher probes with (and tools use)."""
        if self._operator is None:
            self._operator = tls.operator_security(self.environ)
        return self._operator

    def start(
        self,
        *,
        timeout_s: float = 60.0,
        time_wait_s: float = DEFAULT_TIME_WAIT_WAIT_S,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        """Start every member and wait until each serves; MeshError names the first failure.

        A port held only by TIME-WAIT connections is waited for (up to ``time_wait_s``, told
        to ``notify``); one a listener or another socket holds is refused at once.
        """

        def waiting(held: list[str]) -> None:
            if notify is not None:
                notify(
                    f"waiting up to {time_wait_s:.0f} s for TIME-WAIT connections to leave "
                    f"the port of: {', '.join(held)}"
                )

        try:
            wait_until_bindable(
                {m.name: m.address for m in self.members.values()},
                timeout_s=time_wait_s,
                on_wait=waiting,
            )
        except PortsUnavailable as exc:
            raise MeshError(str(exc)) from None
        try:
            self.ensure_pki()
            self.operator.check()
        except (OSError, ValueError) as exc:
            raise MeshError(f"cannot set up TLS identities: {exc}") from exc
        self.start_engines()
        for member in self.members.values():
            self.start_member(member.name)
        try:
            self.wait_ready(self.members, timeout_s=timeout_s)
        except MeshError:
            self.stop()
            raise

    def start_engines(self) -> None:
        """Start each local engine; what it returns (its URL) goes to every member."""
        for engine in self.engines:
            try:
                self.environ.update(engine.start())
            except (OSError, RuntimeError, ValueError) as exc:
                self.stop_engines()
                raise MeshError(f"cannot start {engine.name}: {exc}") from exc

    def stop_engines(self) -> None:
        """Stop the local engines, last started first."""
        for engine in reversed(self.engines):
            engine.stop()

    def start_member(self, name: str) -> Member:
        """(Re)start one member's process without waiting for it."""
        member = self.members[name]
        member.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = member.log_path.open("ab")
        # No preexec_fn: a fork that runs Python code in a process with gRPC threads can
        # abort the child; the child arranges to die with us itself (SUPERVISED_VAR).
        member.process = subprocess.Popen(
            [self._python, "-m", member.module],
            env={**self.environ, **(member.environ or {}), SUPERVISED_VAR: str(os.getpid())},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        member.started_at = time.monotonic()
        return member

    def wait_ready(self, names: Iterable[str], *, timeout_s: float = 60.0) -> None:
        """Wait until each named member serves; MeshError if one dies or the time runs out."""
        pending = list(names)
        deadline = time.monotonic() + timeout_s
        while pending:
            name = pending[0]
            member = self.members[name]
            assert member.process is not None, f"{name} was never started"
            code = member.process.poll()
            if code is not None:
                raise MeshError(
                    f"{name} exited with code {code} while starting; its log "
                    f"({member.log_path}) ends:\n{member.log_tail()}"
                )
            if self.is_ready(name):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise MeshError(
                    f"{name} did not report SERVING on {member.address} in {timeout_s:.0f}s"
                )
            time.sleep(0.05)

    def is_ready(self, name: str) -> bool:
        """Whether a member answers: health SERVING for a service; for the sandbox and the
        console, ``/healthz`` answering with its name (any other HTTP server on its port is
        not it)."""
        member = self.members[name]
        if name in HTTP_MEMBERS:
            host, port = parse_hostport(member.address, variable=name)
            return answers_as(name, host, port, timeout_s=0.5)
        return (
            health_status(member.address, security=self.operator, target=member.service)
            == "SERVING"
        )

    def stop(self, *, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every member, wait up to ``grace_s``, SIGKILL stragglers; exit codes."""
        running = [m for m in self.members.values() if m.process and m.process.poll() is None]
        for member in running:
            assert member.process is not None
            member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for member in running:
            assert member.process is not None
            try:
                member.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        self.stop_engines()
        return {
            m.name: (m.process.returncode if m.process else None) for m in self.members.values()
        }

    def signal(self, name: str, signum: int) -> None:
        """Send ``signum`` to one member (chaos: SIGKILL, SIGSTOP, SIGCONT)."""
        process = self.members[name].process
        assert process is not None, f"{name} was never started"
        process.send_signal(signum)

    def dead(self) -> list[Member]:
        """Members whose process has exited."""
        return [m for m in self.members.values() if m.process and m.process.poll() is not None]

    def exit_code(self, name: str) -> int | None:
        """Exit status of the member's process (negative: the signal); None while it runs."""
        process = self.members[name].process
        return None if process is None else process.poll()

    def pid(self, name: str) -> int | None:
        """Process id of the member's current (or last) process."""
        process = self.members[name].process
        return None if process is None else process.pid


def health_status(
    address: str,
    service: str = "",
    *,
    security: tls.TransportSecurity | None = None,
    target: str = "",
    timeout_s: float = 1.0,
) -> str:
    """grpc.health.v1 Check of ``service`` at ``address``: the status name, or the error code.

    Over mTLS as ``security`` (the operator) verifying mesh service ``target``; plaintext
    without ``security``.
    """
    channel = security.sync_channel(target, address) if security else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def answers_as(name: str, host: str, port: int, *, timeout_s: float) -> bool:
    """Whether ``GET /healthz`` on ``host:port`` answers 200 ``{"status": "ok", "service":
    name}``, as the partner sandbox and the mesh console do."""
    host = host.strip("[]")
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        connection.sock = sock
        # If the probe closes first, its source port stays in TIME-WAIT for a minute; with
        # SO_REUSEADDR that never keeps a server's bind (which sets it too) off that port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(timeout_s)
        sock.connect((host, port))
        connection.request("GET", "/healthz")
        reply = connection.getresponse()
        body = json.loads(reply.read())
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return (
        reply.status == 200
        and isinstance(body, dict)
        and (body.get("status"), body.get("service")) == ("ok", name)
    )


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def render_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _exit_text(member: Member, supervisor: Supervisor | None) -> tuple[str, str]:
    """The restarts and last exit columns of the start table."""
    if supervisor is None:
        return "0", "-"
    report = next(m for m in supervisor.report().members if m.name == member.name)
    exit_text = report.last_exit or "-"
    if report.last_exit_time is not None:
        exit_text += time.strftime(" %H:%M:%S", time.localtime(report.last_exit_time))
    return str(report.restarts), exit_text


def start_table(mesh: Mesh, supervisor: Supervisor | None = None) -> str:
    """Every member: its addresses, whether it serves, its restarts and last exit."""
    rows = [
        (
            m.name,
            m.address,
            m.public_address or "-",
            "SERVING" if mesh.is_ready(m.name) else "NOT SERVING",
            *_exit_text(m, supervisor),
        )
        for m in mesh.members.values()
    ]
    header = ("service", "mesh (mTLS)", "merchants (TLS)", "status", "restarts", "last exit")
    return render_table(rows, header)


def _say(line: str, *, error: bool = False) -> None:
    print(f"paymesh: {line}", file=sys.stderr if error else sys.stdout, flush=True)


def _indented_tail(member: Member, lines: int = 5) -> str:
    tail = member.log_tail(lines)
    return "\n".join(f"    {line}" for line in tail.splitlines()) if tail else "    (empty)"


class _Supervision:
    """The ``make run`` loop's part that restarts members and publishes ``launcher.json``."""

    def __init__(self, mesh: Mesh, policy: RestartPolicy) -> None:
        self.mesh = mesh
        self.supervisor = Supervisor(
            mesh,
            {m.name: m.address for m in mesh.members.values()},
            policy=policy,
            started_at={
                m.name: m.started_at for m in mesh.members.values() if m.started_at is not None
            },
        )
        self.report_path = mesh.var_dir / LAUNCHER_FILE
        self._awaiting: set[str] = set()  # restarted, not seen serving yet
        self._published_at = float("-inf")

    def step(self) -> None:
        """One tick: tell each change, probe restarted members, rewrite the report if due."""
        changes = self.supervisor.tick()
        for change in changes:
            member = self.mesh.members[change.name]
            if change.change is Change.EXITED:
                self._awaiting.discard(change.name)
                line = change.message
                if change.crash_looping:
                    line += f"; its log ({member.log_path}) ends:\n{_indented_tail(member)}"
                _say(line, error=True)
            else:
                _say(change.message)
                if change.change is Change.RESTARTED:
                    self._awaiting.add(change.name)
        for name in sorted(self._awaiting):
            if self.mesh.exit_code(name) is None and self.mesh.is_ready(name):
                self._awaiting.discard(name)
                _say(f"{name} is SERVING again")
        if changes or time.monotonic() - self._published_at >= HEARTBEAT_S:
            self.publish()

    def publish(self) -> None:
        """Write ``launcher.json`` now; a failure to write is told, never fatal."""
        self._published_at = time.monotonic()
        try:
            write_report(self.report_path, self.supervisor.report())
        except OSError as exc:
            _say(f"cannot write {self.report_path}: {exc}", error=True)

    def close(self) -> None:
        """Remove ``launcher.json``: nobody supervises any more."""
        remove_report(self.report_path)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.tools.launcher")
    parser.add_argument(
        "--replicas",
        help="processes per service, e.g. payment-gateway=2,order-service=2 "
        f"(default ${replica_plan.REPLICAS_VAR}; replica k on the ports + k x "
        f"${REPLICA_PORT_STEP_VAR}, default {DEFAULT_REPLICA_PORT_STEP})",
    )
    parser.add_argument(
        "--engines",
        help="servers to run as the launcher's own processes: postgresql, redis or both "
        f"(default ${ENGINES_VAR}); their URLs reach every member",
    )
    return parser.parse_args(argv)


def local_engines(spec: str, environ: Mapping[str, str], var_dir: Path) -> list[LocalEngine]:
    """The engines ``spec`` names (``postgresql,redis``), on the topology's local ports.

    PostgreSQL keeps its data in ``var/postgres`` (made on first use); Redis holds nothing.

    Raises:
        ValueError: an unknown name, or one named twice.
    """
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(LOCAL_ENGINE_NAMES))
    if unknown or len(names) != len(set(names)):
        raise ValueError(
            f"engines {spec!r}: name each of {', '.join(LOCAL_ENGINE_NAMES)} at most once"
        )
    topology = Topology(environ=environ)
    engines: list[LocalEngine] = []
    # PostgreSQL first: the members' stores need it at start; Redis only serves caches.
    if "postgresql" in names:
        engines.append(
            postgres.PostgresEngine(
                var_dir.resolve() / "postgres",
                port=topology.default_port(LOCAL_POSTGRESQL_PORT),
            )
        )
    if "redis" in names:
        engines.append(redis_server.RedisEngine(port=topology.default_port(LOCAL_REDIS_PORT)))
    return engines


def main(argv: Sequence[str] | None = None) -> int:
    """``make run``: start everything, print the table, keep it running until Ctrl-C or
    SIGTERM, stop cleanly. Ends early only when a member cannot start the first time."""
    arguments = _arguments(argv)
    try:
        if arguments.replicas is not None:
            replicas = replica_plan.parse_replicas(arguments.replicas, source="--replicas")
        else:
            env_replicas = os.environ.get(replica_plan.REPLICAS_VAR, "")
            replicas = replica_plan.parse_replicas(env_replicas)
        engines_spec = os.environ.get(ENGINES_VAR, "")
        if arguments.engines is not None:
            engines_spec = arguments.engines
        var_dir = Path(os.environ.get("PAYMESH_VAR_DIR", "var"))
        engines = local_engines(engines_spec, os.environ, var_dir)
        mesh = Mesh(with_console=True, replicas=replicas, engines=engines)
        policy = RestartPolicy.from_environ(mesh.environ)
        # Checked here too, so a bad value is one line, not every member failing to start.
        logs.log_format_name(mesh.environ)
        logs.access_log_sample(mesh.environ)
    except (ValueError, RestartPolicyError, postgres.PostgresUnavailable) as exc:
        print(f"paymesh: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(
        f"starting {len(mesh.members)} processes (logs in {mesh.var_dir / 'logs'}) ...", flush=True
    )
    try:
        mesh.start(notify=lambda line: _say(line, error=True))
    except MeshError as exc:
        print(f"paymesh: {exc}", file=sys.stderr, flush=True)
        return 1
    supervision = _Supervision(mesh, policy)
    supervision.publish()
    print(start_table(mesh, supervision.supervisor), flush=True)
    if CONSOLE in mesh.members:
        print(f"mesh console: http://{mesh.members[CONSOLE].address}/", flush=True)
    security = mesh.operator
    if security.files is not None:
        print(
            f"operator identity: --cacert {security.files.ca} --cert {security.files.cert} "
            f"--key {security.files.key}",
            flush=True,
        )
    print(
        f"mesh is up; members that exit are restarted (state in {supervision.report_path}); "
        "Ctrl-C stops it",
        flush=True,
    )
    renewed_at = time.monotonic()
    try:
        while not stopping:
            if time.monotonic() - renewed_at >= RENEW_INTERVAL_S:
                renewed_at = time.monotonic()
                renewed = mesh.ensure_pki()
                if renewed:
                    _say(f"renewed certificates of {', '.join(renewed)}")
            supervision.step()
            time.sleep(SUPERVISE_INTERVAL_S)
        print("stopping ...", flush=True)
        running = {name for name in mesh.members if mesh.exit_code(name) is None}
        codes = mesh.stop()
    finally:
        supervision.close()
    # A member waiting for its restart exited long ago (and was told then); only the stop counts.
    unclean = {name: code for name, code in codes.items() if name in running and code != 0}
    exit_code = 0
    if unclean:
        print(f"paymesh: unclean exit: {unclean}", file=sys.stderr)
        exit_code = 1
    print("stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
