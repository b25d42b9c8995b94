"""Whether a port can be served on, tested the way the server's own bind does it.

gRPC and asyncio servers bind with SO_REUSEADDR, and so does the test. On Linux that bind still
fails while a TIME-WAIT connection holds the port as its source port, when the client did not set
SO_REUSEADDR (urllib, curl, a plain socket): the kernel shares a port with a TIME-WAIT socket only
if both set it. Such a port is not taken (TIME-WAIT ends by itself within 60 s), so it is told
apart from a port a listener or another bound socket holds, by the kernel's TCP tables.
"""

from __future__ import annotations

import enum
import errno
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from services.mesh.topology import LOOPBACK, parse_hostport

#: The kernel's TCP tables (Linux); a missing one is simply not read.
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: How long Linux keeps a connection in TIME-WAIT (TCP_TIMEWAIT_LEN, not tunable).
TIME_WAIT_S = 60.0
_TIME_WAIT = "06"  # the state column of /proc/net/tcp: TCP_TIME_WAIT

#: How long a start waits for TIME-WAIT connections on its ports to end.
DEFAULT_TIME_WAIT_WAIT_S = TIME_WAIT_S + 5.0
#: How often a waiting start tries the bind again.
RECHECK_INTERVAL_S = 0.25

#: The states of the sockets whose local port is the given port, or None when unknown.
SocketStates = Callable[[int], list[str] | None]
Clock = Callable[[], float]


class PortsUnavailable(Exception):
    """Some ports cannot be served on; the message names each (``name (host:port)``)."""


class PortState(enum.Enum):
    """What a bind of the port would meet."""

    FREE = "free"
    """The server's bind succeeds now."""
    TIME_WAIT = "time-wait"
    """Only TIME-WAIT connections hold it: the bind fails now and succeeds within 60 s."""
    TAKEN = "taken"
    """A listener or another bound socket holds it (or the kernel does not say what does)."""


#: Ports handed out for test and chaos meshes: below Linux's ephemeral range (32768-60999),
#: so no outgoing connection can take one as its source port between pick and bind.
PICK_RANGE = (20000, 32767)


_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK, *, rng: Callable[[int, int], int] = random.randint) -> int:
    """A port below the ephemeral range that was free a moment ago on ``host`` and that this
    process has not handed out before (a mesh's many picks never collide)."""
    for _ in range(200):
        port = rng(*PICK_RANGE)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {PICK_RANGE[0]}-{PICK_RANGE[1]} on {host}")


def socket_states(port: int, tables: Iterable[Path] = TCP_TABLES) -> list[str] | None:
    """State codes (``"0A"`` listen, ``"06"`` TIME-WAIT, ...) of every TCP socket on ``port``.

    None when no table could be read (not Linux). A socket that is bound but neither listens
    nor connects is in no table.
    """
    states: list[str] = []
    read = False
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return states if read else None


def can_bind(host: str, port: int) -> bool:
    """Whether a server's bind of ``host:port`` (SO_REUSEADDR, as gRPC sets it) succeeds now.

    Raises:
        OSError: the bind failed for another reason than the address being in use.
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def port_state(address: str, *, variable: str, states: SocketStates = socket_states) -> PortState:
    """What the server's bind of ``address`` (host:port) meets; ``variable`` names it in errors.

    Raises:
        TopologyError: ``address`` is not host:port.
    """
    host, port = parse_hostport(address, variable=variable)
    try:
        if can_bind(host, port):
            return PortState.FREE
    except OSError:
        return PortState.TAKEN  # the server's bind would fail the same way
    holders = states(port)
    if holders and all(state == _TIME_WAIT for state in holders):
        return PortState.TIME_WAIT
    return PortState.TAKEN


def port_is_free(address: str, *, variable: str) -> bool:
    """Whether nothing but (at most) TIME-WAIT connections holds ``address`` (host:port)."""
    return port_state(address, variable=variable) is not PortState.TAKEN


def wait_until_bindable(
    addresses: Mapping[str, str],
    *,
    timeout_s: float = DEFAULT_TIME_WAIT_WAIT_S,
    probe: Callable[[str, str], PortState] | None = None,
    on_wait: Callable[[list[str]], None] = lambda waiting: None,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once every address (by member name) is FREE; wait out TIME-WAIT-only ones.

    ``on_wait`` is told once which ones are waited for.

    Raises:
        PortsUnavailable: a port is taken, or still held by TIME-WAIT after ``timeout_s``.
    """
    check = probe or (lambda name, address: port_state(address, variable=f"address of {name}"))
    states = {name: check(name, address) for name, address in addresses.items()}
    deadline = clock() + timeout_s
    told = False
    while True:
        taken = [f"{n} ({addresses[n]})" for n, s in states.items() if s is PortState.TAKEN]
        if taken:
            raise PortsUnavailable(f"port already taken for: {', '.join(taken)}")
        waiting = [n for n, s in states.items() if s is PortState.TIME_WAIT]
        if not waiting:
            return
        if not told:
            on_wait([f"{n} ({addresses[n]})" for n in waiting])
            told = True
        if clock() >= deadline:
            held = ", ".join(f"{n} ({addresses[n]})" for n in waiting)
            raise PortsUnavailable(
                f"port still held by TIME-WAIT connections after {timeout_s:.0f} s for: {held}"
            )
        sleep(RECHECK_INTERVAL_S)
        states = {n: check(n, addresses[n]) for n in waiting}
