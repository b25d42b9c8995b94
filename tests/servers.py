"""Run services in the test's own event loop on 127.0.0.1:0, through the real bootstrap.

Every service serves mTLS with certificates of one test PKI (made once per test run); a test
talks to it with :func:`mesh_channel` as the operator or as any mesh service, or to a
merchant-facing port with :func:`public_channel` (TLS without a client certificate).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry.sdk.trace import SpanProcessor

from services.mesh import pki
from services.mesh.admin import HttpLimits
from services.mesh.admin_token import ControlAccess
from services.mesh.authz import grants
from services.mesh.bootstrap import Builder, serve
from services.mesh.tls import PKI_DIR_VAR, TransportSecurity
from services.mesh.topology import SERVICES, Topology, env_prefix
from services.tools.sandbox.app import SANDBOX_LIMITS, Sandbox, SandboxState

log = logging.getLogger("tests.servers")
#: How long past its grace period the teardown waits for a service to stop.
STOP_WAIT_S = 10.0


@functools.cache
def test_pki_dir() -> Path:
    """The test run's development PKI: a CA and a certificate per service and the operator."""
    directory = Path(tempfile.mkdtemp(prefix="paymesh-pki-"))
    pki.ensure_dev_pki(directory, [*(s.name for s in SERVICES), pki.OPERATOR])
    return directory


test_pki_dir.__test__ = False  # type: ignore[attr-defined]  # a fixture helper, not a test


def identity(name: str = pki.OPERATOR) -> TransportSecurity:
    """The test PKI's identity ``name`` (a mesh service or ``operator``)."""
    return TransportSecurity.from_environ(name, {PKI_DIR_VAR: str(test_pki_dir())})


def mesh_channel(
    address: str, *, as_: str = pki.OPERATOR, options: Sequence[tuple[str, Any]] = ()
) -> aio.Channel:
    """An mTLS channel to a mesh port, presenting identity ``as_``."""
    return aio.secure_channel(address, identity(as_).channel_credentials(), options=options)


def sync_mesh_channel(address: str, *, as_: str = pki.OPERATOR) -> grpc.Channel:
    """A blocking mTLS channel to a mesh port, presenting identity ``as_``."""
    return grpc.secure_channel(address, identity(as_).channel_credentials())


def public_channel(address: str) -> aio.Channel:
    """A TLS channel to a merchant-facing port: the server is verified, no client certificate."""
    ca = (test_pki_dir() / "ca.pem").read_bytes()
    return aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))


StubT = TypeVar("StubT")


class _GrantedStub:
    """Routes each method to a channel presenting an identity the topology grants it."""

    def __init__(self, address: str, stub_type: Callable[[aio.Channel], Any], service: str) -> None:
        self._address = address
        self._stub_type = stub_type
        self._by_method = {
            path.rsplit("/", 1)[1]: names for path, names in grants(Topology(), service).items()
        }
        self._stubs: dict[str, Any] = {}
        self._channels: list[aio.Channel] = []

    def _stub(self, name: str) -> Any:
        stub = self._stubs.get(name)
        if stub is None:
            channel = mesh_channel(self._address, as_=name)
            self._channels.append(channel)
            stub = self._stubs[name] = self._stub_type(channel)
        return stub

    def __getattr__(self, method: str) -> Any:
        allowed = self._by_method.get(method)
        if not allowed:
            raise AttributeError(f"no identity is granted {method}")
        who = pki.OPERATOR if pki.OPERATOR in allowed else sorted(allowed)[0]
        return getattr(self._stub(who), method)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@contextlib.asynccontextmanager
async def granted_stub(
    address: str, stub_type: Callable[[aio.Channel], StubT], service: str
) -> AsyncIterator[StubT]:
    """A stub of ``service`` at ``address`` whose every method is called as an identity the
    topology grants it (the operator where it may, else a mesh caller): for tests of a
    service's behaviour; tests of authorization itself use :func:`mesh_channel` directly."""
    stub = _GrantedStub(address, stub_type, service)
    try:
        yield cast(StubT, stub)
    finally:
        await stub.close()


def bearer(secret: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a merchant API key."""
    return (("authorization", f"Bearer {secret}"),)


class ServedAddress(str):
    """The ``host:port`` of a running service's mesh port; ``public`` is its merchant-facing
    TLS port, empty when it has none."""

    public: str = ""


@contextlib.asynccontextmanager
async def running_service(
    name: str,
    build: Builder,
    *,
    environ: Mapping[str, str] | None = None,
    grace_s: float = 1.0,
    span_processors: Sequence[SpanProcessor] = (),
) -> AsyncIterator[ServedAddress]:
    """Serve ``name`` on an ephemeral port; yields its ``host:port`` (and ``.public``).

    ``environ`` sets the topology overrides (addresses of the downstreams the service
    calls, ``PAYMESH_VAR_DIR``, ...); the service's own address is forced to port 0.
    ``span_processors`` receive the service's spans (an in-memory exporter's processor).
    """
    env = dict(environ or {})
    env[f"{env_prefix(name)}_ADDR"] = "127.0.0.1:0"
    env.setdefault(f"{env_prefix(name)}_ADMIN_ADDR", "127.0.0.1:0")
    env.setdefault(f"{env_prefix(name)}_PUBLIC_ADDR", "127.0.0.1:0")
    env.setdefault(PKI_DIR_VAR, str(test_pki_dir()))
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    public: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            name,
            build,
            topology=Topology(environ=env),
            grace_s=grace_s,
            span_processors=span_processors,
            stop=stop,
            on_ready=ready.set_result,
            on_public_ready=public.append,
        )
    )
    started: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    address = ServedAddress(ready.result())
    address.public = public[0] if public else ""
    try:
        yield address
    finally:
        stop.set()
        # Bounded: with every service in one event loop, grpc.aio's server stop has been seen
        # (rarely, after a test killed Redis) to wait on past its grace period; the test's
        # verdict is in by now, so the teardown moves on, leaving the task to the loop's end.
        finished, _ = await asyncio.wait({task}, timeout=grace_s + STOP_WAIT_S)
        if finished:
            task.result()
        else:
            log.warning("%s had not stopped %.0fs after its grace period", name, STOP_WAIT_S)


@dataclass(slots=True)
class _Started:
    """How a service of the harness was started, so it can be started again the same way."""

    build: Builder
    environ: dict[str, str]
    grace_s: float
    span_processors: Sequence[SpanProcessor]
    instance: contextlib.AsyncExitStack
    address: ServedAddress


class ServicesUnderTest:
    """Services a test runs through the real bootstrap, and stubs to them, all closed when the
    test ends (the ``services`` fixture of ``tests/conftest.py``; :func:`services_under_test`
    outside a fixture).

    Every service gets :attr:`environ` (the test's own ``PAYMESH_VAR_DIR``, the sandbox's
    address once :meth:`sandbox` runs, whatever a test adds), then ``<NAME>_ADDR`` of every
    service already running here, so start downstreams first and their callers find them;
    then its own ``environ``. :meth:`restart` stops a service and starts it again on the same
    data; :meth:`instance` runs a second one beside it for a block.
    """

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        var_dir: Path,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stack = stack
        """Closes the test's services; enter anything else that should close with them."""
        self.var_dir = var_dir
        self.environ: dict[str, str] = {"PAYMESH_VAR_DIR": str(var_dir), **(environ or {})}
        """What every service started from now on gets."""
        self._started: dict[str, _Started] = {}

    @property
    def addresses(self) -> dict[str, ServedAddress]:
        """The mesh address of each running service, by name."""
        return {name: started.address for name, started in self._started.items()}

    def environ_of(self, name: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environ ``name`` starts with here: the shared one, the other running services'
        addresses, its own from :meth:`start` (if it ran), then ``environ``."""
        started = self._started.get(name)
        return {
            **self.environ,
            **{
                f"{env_prefix(other)}_ADDR": str(s.address)
                for other, s in self._started.items()
                if other != name
            },
            **(started.environ if started is not None else {}),
            **(environ or {}),
        }

    def sandbox(self, access: ControlAccess | None = None) -> SandboxState:
        """The partner sandbox (see :func:`running_sandbox`) for every service started after."""
        address, state = self.stack.enter_context(running_sandbox(access))
        self.environ["PARTNER_SANDBOX_ADDR"] = address
        return state

    async def start(
        self,
        name: str,
        build: Builder,
        *,
        environ: Mapping[str, str] | None = None,
        grace_s: float = 1.0,
        span_processors: Sequence[SpanProcessor] = (),
    ) -> ServedAddress:
        """Serve ``name`` (see :func:`running_service`) until the test ends or it is
        stopped; its address. ``environ`` goes on top of the shared one, for this service
        only, and again on each :meth:`restart`."""
        if name in self._started:
            raise ValueError(f"{name} already runs here; restart it or run an instance")
        own = dict(environ or {})
        instance = contextlib.AsyncExitStack()
        self.stack.push_async_callback(instance.aclose)
        address = await instance.enter_async_context(
            running_service(
                name,
                build,
                environ=self.environ_of(name, own),
                grace_s=grace_s,
                span_processors=span_processors,
            )
        )
        self._started[name] = _Started(build, own, grace_s, span_processors, instance, address)
        return address

    async def stop(self, name: str) -> _Started:
        """Stop ``name`` (gracefully, as SIGTERM would); its data stays."""
        started = self._started.pop(name)
        await started.instance.aclose()
        return started

    async def restart(
        self, name: str, *, environ: Mapping[str, str] | None = None
    ) -> ServedAddress:
        """Stop ``name`` and start it again on the same data dir with the same build; its new
        address. ``environ`` adds to (and from now on stays in) its own. Services started
        before keep the old address of it: restart the callers too if they need the new one."""
        started = await self.stop(name)
        return await self.start(
            name,
            started.build,
            environ={**started.environ, **(environ or {})},
            grace_s=started.grace_s,
            span_processors=started.span_processors,
        )

    def instance(
        self,
        name: str,
        *,
        build: Builder | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[ServedAddress]:
        """Another instance of ``name`` for a block, on the same data dir (a start after a
        crash, a second replica, one with a downstream cut off): the build and environ it was
        started with here, ``environ`` on top; ``build`` for one not started here."""
        started = self._started.get(name)
        if build is None:
            if started is None:
                raise ValueError(f"{name} was not started here: give its build")
            build = started.build
        return running_service(name, build, environ=self.environ_of(name, environ))

    async def stub(
        self, address: str, stub_type: Callable[[aio.Channel], StubT], service: str
    ) -> StubT:
        """A :func:`granted_stub` of ``service`` at ``address``, closed when the test ends."""
        return await self.stack.enter_async_context(granted_stub(address, stub_type, service))

    async def serve(
        self,
        name: str,
        build: Builder,
        stub_type: Callable[[aio.Channel], StubT],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> StubT:
        """Serve ``name`` and return a granted stub to it: the usual service under test."""
        address = await self.start(name, build, environ=environ)
        return await self.stub(address, stub_type, name)


@contextlib.asynccontextmanager
async def services_under_test(
    var_dir: Path, *, environ: Mapping[str, str] | None = None
) -> AsyncIterator[ServicesUnderTest]:
    """A :class:`ServicesUnderTest` over ``var_dir`` for the block (the fixture's, outside one)."""
    async with contextlib.AsyncExitStack() as stack:
        yield ServicesUnderTest(stack, var_dir, environ=environ)


def rich_status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carries in ``grpc-status-details-bin``, else a bare
    one with the call's code and message."""
    assert isinstance(error, grpc.Call | aio.AioRpcError), f"not a call's error: {error!r}"
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=error.code().value[0], message=error.details() or "")


def error_info_of(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo a failed call carries, None if it carries none."""
    for detail in rich_status_of(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (``ORDER_NOT_FOUND``, ...), empty if it has none."""
    info = error_info_of(error)
    return info.reason if info is not None else ""


@contextlib.contextmanager
def running_sandbox(
    access: ControlAccess | None = None, *, limits: HttpLimits = SANDBOX_LIMITS
) -> Iterator[tuple[str, SandboxState]]:
    """The partner sandbox on an ephemeral port, on its own event loop in a thread; yields
    its address and state.

    Put the address into ``PARTNER_SANDBOX_ADDR`` of a service's environ so its partner
    clients reach it; the state shows what the partners received (charges, webhooks, ...).
    ``access`` opens its fault switches (``/_control/faults``); by default they are off.
    """
    sandbox = Sandbox(access=access, limits=limits)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started: concurrent.futures.Future[int] = concurrent.futures.Future()

    async def serve() -> None:
        try:
            started.set_result(await sandbox.start("127.0.0.1", 0))
        except BaseException as exc:
            started.set_exception(exc)
            raise
        await stop.wait()
        await sandbox.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        port = started.result(timeout=30)
        yield f"127.0.0.1:{port}", sandbox.state
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
