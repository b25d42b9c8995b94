"""``python -m services.tools.console``: serve the mesh console on ``PAYMESH_CONSOLE_ADDR``.

Needs the operator identity (``var/pki/operator.pem``, made by ``make run``) to read the mesh.
Exit status 2 with one line naming the problem when the configuration is bad.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from services.mesh.bootstrap import die_with_supervisor
from services.mesh.tls import TlsConfigError, operator_security
from services.mesh.topology import CONSOLE_VAR, Topology, TopologyError, parse_hostport
from services.tools.console.server import CONSOLE_NAME, ConsoleServer


async def _serve(topology: Topology, host: str, port: int) -> int:
    console = ConsoleServer(topology)
    try:
        bound = await console.start(host, port)
    except OSError as exc:
        print(f"{CONSOLE_NAME}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PAYMESH_READY service={CONSOLE_NAME} address={host}:{bound}", flush=True)
    print(f"{CONSOLE_NAME}: open http://{host}:{bound}/", flush=True)
    await stop.wait()
    await console.stop()
    return 0


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    die_with_supervisor()
    logging.basicConfig(
        level="INFO", format=f"%(asctime)s {CONSOLE_NAME} %(levelname)s %(message)s"
    )
    try:
        topology = Topology()
        host, port = parse_hostport(topology.console_address(), variable=CONSOLE_VAR)
        operator_security(topology.environ).check()
    except (TopologyError, TlsConfigError) as exc:
        print(f"{CONSOLE_NAME}: cannot start: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(topology, host, port))


if __name__ == "__main__":
    sys.exit(main())
