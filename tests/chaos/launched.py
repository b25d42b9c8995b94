"""The mesh as ``make run`` runs it, its members kept up by the launcher.

The chaos run restarts nothing itself. It reads each member's pid from the launcher's
``<var>/launcher.json`` to signal it (only a process whose parent is that launcher), and after a
kill -9 waits for the launcher to bring the member back: a new pid in the report, one restart
more, then health SERVING. A :class:`~services.tools.launcher.Mesh` built from the same environment
(never started here) gives the addresses and the operator identity.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.mesh.tls import TransportSecurity
from services.tools.launcher import Member, Mesh, MeshError
from services.tools.supervisor import LAUNCHER_FILE, LauncherReport, MemberReport, read_report

POLL_S = 0.1


@dataclass(slots=True)
class Comeback:
    """One kill -9 of a member and what the launcher did about it (times: run seconds)."""

    name: str
    killed_at: float
    old_pid: int
    restarts_before: int
    new_pid: int | None = None
    restarts_after: int | None = None
    last_exit: str = ""
    """The exit the launcher reported for the killed process (``SIGKILL``)."""
    restarted_after_s: float | None = None
    """Seconds from the kill until launcher.json showed the new process."""
    serving_after_s: float | None = None
    """Seconds from the kill until the new process answered health SERVING."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "killed_at_s": round(self.killed_at, 2),
            "old_pid": self.old_pid,
            "new_pid": self.new_pid,
            "restarts_before": self.restarts_before,
            "restarts_after": self.restarts_after,
            "last_exit": self.last_exit,
            "restarted_after_s": _round(self.restarted_after_s),
            "serving_after_s": _round(self.serving_after_s),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class LaunchedMesh:
    """``python -m services.tools.launcher`` as a child, driven through ``launcher.json``."""

    def __init__(
        self,
        environ: Mapping[str, str],
        var_dir: Path,
        *,
        now: Callable[[], float] = time.monotonic,
        python: str = sys.executable,
    ) -> None:
        self.mesh = Mesh(environ=environ, var_dir=var_dir)
        self.environ = self.mesh.environ
        self.var_dir = self.mesh.var_dir
        self.report_path = self.var_dir / LAUNCHER_FILE
        self.log_path = self.var_dir / "logs" / "launcher.log"
        self.now = now
        self.comebacks: list[Comeback] = []
        self.final_report: LauncherReport | None = None
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def members(self) -> dict[str, Member]:
        """Every member by name (addresses; the processes are the launcher's)."""
        return self.mesh.members

    @property
    def operator(self) -> TransportSecurity:
        """The operator identity, on the PKI the launcher made."""
        return self.mesh.operator

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Start the launcher; return once its report lists every member running.

        The launcher publishes ``launcher.json`` only after every member reported SERVING.

        Raises:
            MeshError: the launcher exited, or did not report in ``timeout_s``.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self._python, "-m", "services.tools.launcher"],
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the run, which stops the launcher
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise MeshError(
                    f"the launcher exited with code {code}; its log ends:\n{self._tail()}"
                )
            report = read_report(self.report_path)
            if report is not None and self._all_running(report):
                return
            if time.monotonic() > deadline:
                raise MeshError(f"the launcher did not start in {timeout_s:.0f} s:\n{self._tail()}")
            time.sleep(0.2)

    def _all_running(self, report: LauncherReport) -> bool:
        names = {m.name for m in report.members if m.running}
        return names >= set(self.members)

    def report(self) -> LauncherReport:
        """The launcher's current report.

        Raises:
            MeshError: there is none (the launcher is not running).
        """
        report = read_report(self.report_path)
        if report is None:
            raise MeshError(f"no {self.report_path}: the launcher is not running")
        return report

    def member(self, name: str) -> MemberReport:
        """One member as the launcher reports it."""
        return next(m for m in self.report().members if m.name == name)

    def signal(self, name: str, signum: int) -> int:
        """Send ``signum`` to the member's current process; returns its pid.

        Raises:
            MeshError: it has no running process, or that pid is not the launcher's child.
        """
        member = self.member(name)
        if member.pid is None or not member.running:
            raise MeshError(f"{name} has no running process to signal")
        self._require_child(member.pid, name)
        os.kill(member.pid, signum)
        return member.pid

    def kill(self, name: str) -> Comeback:
        """kill -9 the member; the launcher is to restart it (see :meth:`wait_back`)."""
        restarts = self.member(name).restarts
        pid = self.signal(name, signal.SIGKILL)
        comeback = Comeback(name=name, killed_at=self.now(), old_pid=pid, restarts_before=restarts)
        self.comebacks.append(comeback)
        return comeback

    def wait_back(self, name: str, bound_s: float) -> Comeback:
        """Wait (up to ``bound_s`` from the kill) until the launcher restarted the member and
        the new process answers SERVING; the comeback says how far it got."""
        comeback = next(c for c in reversed(self.comebacks) if c.name == name)
        while self.now() - comeback.killed_at < bound_s:
            member = self.member(name)
            if member.running and member.pid not in (None, comeback.old_pid):
                if comeback.restarted_after_s is None:
                    comeback.restarted_after_s = self.now() - comeback.killed_at
                    comeback.new_pid = member.pid
                    comeback.restarts_after = member.restarts
                    comeback.last_exit = member.last_exit
                if self.mesh.is_ready(name):
                    comeback.serving_after_s = self.now() - comeback.killed_at
                    return comeback
            time.sleep(POLL_S)
        return comeback

    def stop(self, *, grace_s: float = 60.0) -> int | None:
        """SIGTERM the launcher (it stops every member) and wait; its exit code.

        The last report is kept in ``final_report``. A launcher that does not stop within
        ``grace_s`` is killed (its members then get SIGTERM from the kernel, PDEATHSIG).
        """
        if self._process is None:
            return None
        try:
            self.final_report = read_report(self.report_path)
        except ValueError:
            self.final_report = None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def _require_child(self, pid: int, name: str) -> None:
        """Refuse to signal a pid the launcher did not start (a stale report, a reused pid)."""
        assert self._process is not None, "the launcher was never started"
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            raise MeshError(f"{name}: pid {pid} is gone") from None
        except OSError:
            return  # no /proc to ask: the report is the launcher's own word
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent != self._process.pid:
            raise MeshError(f"{name}: pid {pid} is not a child of the launcher")

    def _tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
