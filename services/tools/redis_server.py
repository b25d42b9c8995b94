"""A local redis-server as a plain child process: a free port below 32768, no persistence.

Tests and local multi-replica runs start one with :func:`start` (or ``with RedisServer()``)
and get its ``url``; :meth:`RedisServer.kill` is a real SIGKILL, for the tests of what a
service does when Redis dies; :class:`RedisEngine` is the launcher's ``LocalEngine`` for it.
Nothing is written outside its temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from services.mesh.topology import LOOPBACK
from services.storage.shared_state import REDIS_URL_VAR
from services.tools.ports import free_port

BINARY = "redis-server"
#: How long a start waits for the server to answer PING.
START_TIMEOUT_S = 10.0


class RedisUnavailable(RuntimeError):
    """redis-server is not installed or did not come up; the message says which."""


def binary() -> str | None:
    """The redis-server executable on PATH, or None (``apt-get install redis-server``)."""
    return shutil.which(BINARY)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on ``127.0.0.1:port``, in-memory only."""

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING.

        Raises:
            RedisUnavailable: redis-server is missing or did not answer in time.
        """
        executable = binary()
        if executable is None:
            raise RedisUnavailable(f"{BINARY} is not installed (apt-get install -y redis-server)")
        self._dir = Path(tempfile.mkdtemp(prefix="paymesh-redis-"))
        # No RDB snapshots, no AOF: a cache and counters, nothing to keep past the process.
        command = [
            executable,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self._dir
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pings(self.port):
            if self._process.poll() is not None:
                error = (self._process.stderr.read() if self._process.stderr else b"").decode()
                self._cleanup()
                raise RedisUnavailable(f"{BINARY} exited at start: {error.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"{BINARY} did not answer PING within {START_TIMEOUT_S}s")
            time.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like to its clients) and reap it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def stop(self) -> None:
        """Terminate the server and remove its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start(*, port: int | None = None) -> RedisServer:
    """A started :class:`RedisServer` (stop it with :meth:`RedisServer.stop`)."""
    return RedisServer(port=port).start()


class RedisEngine:
    """A :class:`RedisServer` as the launcher's ``LocalEngine``: gives members ``REDIS_URL``."""

    name = "redis"

    def __init__(self, *, port: int | None = None) -> None:
        self.server = RedisServer(port=port)

    def start(self) -> dict[str, str]:
        """Start redis-server; the environment pointing every member at it."""
        self.server.start()
        return {REDIS_URL_VAR: self.server.url}

    def stop(self) -> None:
        """Stop redis-server (after the members)."""
        self.server.stop()
