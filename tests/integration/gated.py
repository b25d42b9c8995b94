"""A test servicer whose calls are held until the test opens its gate, and a target process.

``GatedServicer`` holds every attempt (counted in ``active``) until ``gate`` is set, so a
test can fill a target's limit of calls in flight and release them without sleeping.
``python -m tests.integration.gated`` serves a ``ScriptedServicer`` in a process of its own
and prints ``PORT <n>``: a real target to SIGSTOP.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from tests.integration.harness import ScriptedServicer, start_server

READY_PREFIX = "PORT "


@dataclass
class GatedServicer(ScriptedServicer):
    """Holds each attempt until ``gate`` is set, then serves it as scripted."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0

    async def _serve(self, method: str, context: aio.ServicerContext[Any, Any]) -> None:
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        await super()._serve(method, context)


async def _serve_forever() -> None:
    running = await start_server(ScriptedServicer(name="test-service"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"{READY_PREFIX}{running.port}", flush=True)
    await stop.wait()
    await running.server.stop(None)


if __name__ == "__main__":
    asyncio.run(_serve_forever())
