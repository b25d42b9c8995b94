"""Run services in the test's own event loop on 127.0.0.1:0, through the real bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

from opentelemetry.sdk.trace import SpanProcessor

from services.bootstrap import Builder, serve
from services.partners.sandbox import SandboxServer, SandboxState
from services.topology import Topology, env_prefix


@contextlib.asynccontextmanager
async def running_service(
    name: str,
    build: Builder,
    *,
    environ: Mapping[str, str] | None = None,
    grace_s: float = 1.0,
    span_processors: Sequence[SpanProcessor] = (),
) -> AsyncIterator[str]:
    """Serve ``name`` on an ephemeral port; yields its ``host:port``.

    ``environ`` sets the topology overrides (addresses of the downstreams the service
    calls, ``PAYMESH_VAR_DIR``, ...); the service's own address is forced to port 0.
    ``span_processors`` receive the service's spans (an in-memory exporter's processor).
    """
    env = dict(environ or {})
    env[f"{env_prefix(name)}_ADDR"] = "127.0.0.1:0"
    env.setdefault(f"{env_prefix(name)}_ADMIN_ADDR", "127.0.0.1:0")
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
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
        )
    )
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    try:
        yield ready.result()
    finally:
        stop.set()
        await task


@contextlib.contextmanager
def running_sandbox() -> Iterator[tuple[str, SandboxState]]:
    """The partner sandbox on an ephemeral port in a thread; yields its address and state.

    Put the address into ``PARTNER_SANDBOX_ADDR`` of a service's environ so its partner
    clients reach it; the state shows what the partners received (charges, webhooks, ...).
    """
    server = SandboxServer(("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
