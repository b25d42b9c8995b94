"""The launcher's port pre-check against real sockets: it must say what the server's bind does.

A port an earlier client connection used as its source port stays in TIME-WAIT for a minute
after that client closed first. That is not "taken" (nothing listens, it ends by itself), but
whether a server can bind it now depends on the client having set SO_REUSEADDR, so the check
is held against a real gRPC server's bind of the same port.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from grpc import aio

from services.tools.launcher import Mesh, MeshError, ephemeral_environ
from services.tools.ports import PortState, can_bind, port_is_free, port_state, socket_states

HOST = "127.0.0.1"


def _time_wait_port(*, client_reuse: bool) -> int:
    """A port that a closed client connection left in TIME-WAIT as its source port.

    Another connection of the machine may hold the same port number too (the kernel's
    tables are matched by port): take a port that only our TIME-WAIT holds.
    """
    for _ in range(20):
        with socket.socket() as listener:
            listener.bind((HOST, 0))
            listener.listen()
            client = socket.socket()
            if client_reuse:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.connect(listener.getsockname())
            port = int(client.getsockname()[1])
            accepted, _ = listener.accept()
            client.close()  # the client closes first: its side goes to TIME-WAIT
            accepted.close()
        if socket_states(port) == ["06"]:
            return port
    raise AssertionError("no port held by exactly one TIME-WAIT socket in 20 tries")


async def _grpc_server_binds(port: int) -> bool:
    """Whether a gRPC server (options as bootstrap sets them) can listen on ``port`` now."""
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    try:
        server.add_insecure_port(f"{HOST}:{port}")
    except RuntimeError:
        return False
    finally:
        await server.stop(None)
    return True


@pytest.mark.parametrize("client_reuse", [False, True], ids=["plain-client", "reuseaddr-client"])
async def test_a_time_wait_source_port_is_not_taken_and_the_check_agrees_with_grpc(
    client_reuse: bool,
) -> None:
    port = _time_wait_port(client_reuse=client_reuse)

    state = port_state(f"{HOST}:{port}", variable="port")
    free = port_is_free(f"{HOST}:{port}", variable="port")
    check_binds = can_bind(HOST, port)
    server_binds = await _grpc_server_binds(port)  # last: its socket may outlive its stop

    assert free
    # FREE exactly when the server's own bind succeeds now; else it waits for TIME-WAIT to end.
    assert state is (PortState.FREE if server_binds else PortState.TIME_WAIT)
    assert check_binds is server_binds


async def test_a_listener_takes_the_port() -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        port = int(listener.getsockname()[1])

        assert port_state(f"{HOST}:{port}", variable="port") is PortState.TAKEN
        assert not await _grpc_server_binds(port)


async def test_a_socket_bound_without_listening_takes_the_port() -> None:
    with socket.socket() as bound:
        bound.bind((HOST, 0))
        port = int(bound.getsockname()[1])

        assert port_state(f"{HOST}:{port}", variable="port") is PortState.TAKEN
        assert not await _grpc_server_binds(port)


async def test_an_open_client_connection_from_the_port_takes_it() -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            port = int(client.getsockname()[1])
            accepted, _ = listener.accept()
            with accepted:
                assert port_state(f"{HOST}:{port}", variable="port") is PortState.TAKEN
                assert not await _grpc_server_binds(port)


def test_an_unused_port_is_free() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = int(probe.getsockname()[1])

    assert port_state(f"{HOST}:{port}", variable="port") is PortState.FREE


def test_the_mesh_waits_for_time_wait_on_a_member_port_and_names_it_when_it_outlasts_the_wait(
    tmp_path: Path,
) -> None:
    port = _time_wait_port(client_reuse=False)
    environ = ephemeral_environ()
    environ["ORDER_SERVICE_ADDR"] = f"{HOST}:{port}"
    mesh = Mesh(environ=environ, names=["order-service"], var_dir=tmp_path, with_sandbox=False)
    notes: list[str] = []

    with pytest.raises(MeshError, match=r"TIME-WAIT .*order-service"):
        mesh.start(timeout_s=30, time_wait_s=0.5, notify=notes.append)

    assert len(notes) == 1 and f":{port}" in notes[0] and "order-service" in notes[0]
    assert mesh.members["order-service"].process is None  # nothing was started
