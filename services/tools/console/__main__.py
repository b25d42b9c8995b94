"""``python -m services.tools.console``: serve the mesh console on ``PAYMESH_CONSOLE_ADDR``.

Needs the operator identity (``var/pki/operator.pem``, made by ``make run``) to read the mesh.
Exit status 2 with one line naming the problem when the configuration is bad.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from services.mesh.bootstrap import die_with_supervisor, serve_http_member
from services.mesh.tls import TlsConfigError, operator_security
from services.mesh.topology import CONSOLE_VAR, Topology, TopologyError, parse_hostport
from services.tools.console.server import CONSOLE_NAME, ConsoleServer


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
    return asyncio.run(serve_http_member(CONSOLE_NAME, ConsoleServer(topology), host, port))


if __name__ == "__main__":
    sys.exit(main())
