"""A throwaway local PostgreSQL cluster from the Debian binaries: initdb, start, stop.

For tests and local runs: the cluster lives in one directory, listens on 127.0.0.1 at a port
below the ephemeral range, trusts local connections and runs with ``fsync=off`` (its data is
disposable). PostgreSQL refuses to run as root, so as root every binary runs as the
``postgres`` user (``runuser``). ``python -m services.tools.postgres DIR`` starts one and
prints its URL until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from services.tools.ports import free_port

#: Where Debian puts each major version's binaries (``/usr/lib/postgresql/15/bin``).
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: Overrides where the binaries are looked for.
BIN_DIR_VAR = "PAYMESH_POSTGRES_BIN"
#: The superuser of the clusters made here (trusted on 127.0.0.1 only).
SUPERUSER = "postgres"
#: The unprivileged account PostgreSQL runs as when this process is root.
RUN_AS = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the cluster would not start (the message says which)."""


def bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``.

    ``PAYMESH_POSTGRES_BIN`` if set, else the newest Debian version, else ``PATH``.
    """
    override = os.environ.get(BIN_DIR_VAR)
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None
    if DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in DEBIAN_ROOT.iterdir() if (p / "bin" / "initdb").exists()),
            key=lambda p: int(p.name) if p.name.isdigit() else 0,
        )
        if versions:
            return versions[-1] / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_postgres() -> list[str]:
    """The prefix that runs a binary as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and runuser is missing")
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no {RUN_AS!r} user") from None
    return [runuser, "-u", RUN_AS, "--"]


@dataclass
class LocalCluster:
    """One PostgreSQL cluster in ``directory``, on ``127.0.0.1:port``.

    Args:
        directory: where the data, socket and log go; made (and handed to ``postgres``
            when root) if missing. Its parents must be traversable by that user.
        port: a port below 32768; a free one if 0.
    """

    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    _bin: Path = field(init=False)

    def __post_init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise PostgresUnavailable(
                "no PostgreSQL binaries (apt-get install postgresql, or set PAYMESH_POSTGRES_BIN)"
            )
        self._bin = found
        if self.port == 0:
            self.port = free_port(self.host)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self.directory / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this cluster."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Initialise the cluster if new, then start it and wait until it accepts connections.

        Raises:
            PostgresUnavailable: initdb or the start failed (the log's tail is in the message).
        """
        prefix = _as_postgres()
        self.directory.mkdir(parents=True, exist_ok=True)
        if prefix:
            shutil.chown(self.directory, RUN_AS, RUN_AS)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    *prefix,
                    str(self._bin / "initdb"),
                    "--pgdata",
                    str(self.data_dir),
                    "--username",
                    SUPERUSER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--no-sync",
                ],
                "initdb",
                timeout_s,
            )
        options = " ".join(
            [
                f"-p {self.port}",
                f"-c listen_addresses={self.host}",
                f"-c unix_socket_directories={self.directory}",
                # Disposable data: no flush to disk, the speed of a test database.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            [
                *prefix,
                str(self._bin / "pg_ctl"),
                "start",
                "--wait",
                "--timeout",
                str(round(timeout_s)),
                "--pgdata",
                str(self.data_dir),
                "--log",
                str(self.log_file),
                "--options",
                options,
            ],
            "pg_ctl start",
            timeout_s + 5,
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown); the directory stays."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            [
                *_as_postgres(),
                str(self._bin / "pg_ctl"),
                "stop",
                "--wait",
                "--mode",
                "fast",
                "--pgdata",
                str(self.data_dir),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier); its URL."""
        import psycopg  # only callers that make databases need the driver

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _run(self, argv: list[str], what: str, timeout_s: float) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            tail = ""
            if self.log_file.exists():
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-5:])
            raise PostgresUnavailable(
                f"{what} failed ({done.returncode}): {done.stderr.strip()[-500:]} {tail}".strip()
            )


def temporary_directory() -> Path:
    """A fresh directory under the system's temp dir that the ``postgres`` user can enter."""
    # /tmp itself is world-traversable; a pytest tmp_path under a 0700 root directory is not.
    return Path(tempfile.mkdtemp(prefix="paymesh-postgres-"))


def main() -> None:
    """Start a cluster in DIR (a temporary one if not given), print its URL, stop on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", nargs="?", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    cluster = LocalCluster(args.directory or temporary_directory(), port=args.port)
    cluster.start()
    print(cluster.url(), flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
