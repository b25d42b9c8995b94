"""Keeps the mesh's members running: a member that exits is started again, after a backoff.

Like a Kubernetes ``restartPolicy: Always``: the delay doubles from 1 s up to 30 s while a member
keeps exiting within a minute of its start, and is reset once it stayed up a minute. A member
that exited ``crash_loop_exits`` times in a row that way is crash-looping: still restarted (its
port may come free, its database back), and said loudly. Processes and clocks are injected, so
:meth:`Supervisor.tick` is stepped exactly in tests; the launcher publishes its
:meth:`Supervisor.report` as ``<var>/launcher.json`` for ``make status``. No gRPC import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Clock = Callable[[], float]

#: The file under the var directory where the running launcher reports its members.
LAUNCHER_FILE = "launcher.json"
#: How often the launcher rewrites the file when nothing changed (its ``updated_time``).
HEARTBEAT_S = 2.0


class RestartPolicyError(ValueError):
    """A restart setting is not usable; the message names the variable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """When a member that exited is started again."""

    initial_backoff_s: float = 1.0
    """Delay before the first restart (``PAYMESH_RESTART_BACKOFF_S``)."""
    max_backoff_s: float = 30.0
    """The delay doubles at each exit in a row up to this (``PAYMESH_RESTART_MAX_BACKOFF_S``)."""
    stable_s: float = 60.0
    """A member up this long is stable: its next exit starts the delays from the first one
    again (``PAYMESH_RESTART_STABLE_S``)."""
    crash_loop_exits: int = 3
    """Exits in a row without a stable run between them after which the member is reported
    crash-looping (``PAYMESH_CRASH_LOOP_EXITS``)."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if getattr(self, item.name) <= 0:
                raise RestartPolicyError(f"{item.name} must be > 0, got {getattr(self, item.name)}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise RestartPolicyError(
                f"max_backoff_s ({self.max_backoff_s}) is below initial_backoff_s "
                f"({self.initial_backoff_s})"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RestartPolicy:
        """The defaults, overridden by the ``PAYMESH_RESTART_*`` variables that are set.

        Raises:
            RestartPolicyError: a variable is not a positive number, or the bounds disagree.
        """
        values: dict[str, Any] = {}
        for variable, name, kind in _VARIABLES:
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                values[name] = kind(text)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise RestartPolicyError(f"{variable}={text!r} is not {what}") from None
        try:
            return cls(**values)
        except RestartPolicyError as exc:
            message = str(exc)
            for variable, name, _ in _VARIABLES:
                message = message.replace(name, variable)
            raise RestartPolicyError(message) from None

    def delay_s(self, exits_in_a_row: int) -> float:
        """Delay before the restart that follows exit number ``exits_in_a_row`` (1 = first)."""
        if exits_in_a_row < 1:
            raise ValueError(f"exits_in_a_row starts at 1, got {exits_in_a_row}")
        return min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (exits_in_a_row - 1))


_VARIABLES: tuple[tuple[str, str, Callable[[str], float | int]], ...] = (
    ("PAYMESH_RESTART_BACKOFF_S", "initial_backoff_s", float),
    ("PAYMESH_RESTART_MAX_BACKOFF_S", "max_backoff_s", float),
    ("PAYMESH_RESTART_STABLE_S", "stable_s", float),
    ("PAYMESH_CRASH_LOOP_EXITS", "crash_loop_exits", int),
)


def describe_exit(code: int) -> str:
    """An exit status as an operator reads it: ``exit 2``, or the signal's name (``SIGKILL``)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class Processes(Protocol):
    """The members' processes, as the supervisor drives them (the launcher's ``Mesh``)."""

    def start_member(self, name: str) -> object:
        """Start the member's process (again) without waiting for it."""

    def exit_code(self, name: str) -> int | None:
        """The exit status of its process (negative: killed by that signal); None while it runs."""

    def pid(self, name: str) -> int | None:
        """Its process id, None when it has none."""


class Change(enum.Enum):
    """What a tick found."""

    EXITED = "exited"
    """A member's process exited; its restart is scheduled."""
    RESTARTED = "restarted"
    """A member was started again."""
    STABLE = "stable"
    """A member that had exited stayed up ``stable_s``: its backoff is reset."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """One change of one member, with the line that tells it."""

    name: str
    """The member."""
    change: Change
    """What happened."""
    message: str
    """One line for the operator."""
    crash_looping: bool = False
    """Whether the member is crash-looping now (say it loudly)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberReport:
    """One member as ``launcher.json`` and ``make status`` show it."""

    name: str
    """Mesh name (a service, or the partner sandbox)."""
    address: str
    """``host:port`` it serves on, so a reader can tell it is the mesh it asks."""
    pid: int | None
    """Process id of its current (or last) process."""
    running: bool
    """Whether that process runs (False while waiting for a restart)."""
    restarts: int
    """Times it was started again since the launcher started."""
    last_exit: str
    """``exit 2``, ``SIGKILL``, ``cannot start: ...``; empty if it never exited."""
    last_exit_code: int | None
    """That exit status (negative: the signal), None if none."""
    last_exit_time: float | None
    """When it exited (epoch seconds), None if never."""
    crash_looping: bool
    """Whether it exited ``crash_loop_exits`` times in a row without a stable run between."""
    next_restart_in_s: float | None
    """Seconds until its restart while it waits for one, else None."""
    up_since_time: float | None
    """When its current process started (epoch seconds), None while it waits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LauncherReport:
    """What ``<var>/launcher.json`` holds."""

    pid: int
    """Process id of the launcher."""
    started_time: float
    """When it started (epoch seconds)."""
    updated_time: float
    """When it wrote this (epoch seconds); rewritten every ``heartbeat_s`` at least."""
    heartbeat_s: float
    """How often it rewrites the file while it runs."""
    members: tuple[MemberReport, ...] = field(default_factory=tuple)
    """Every member, in start order."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> LauncherReport:
        """Read what :meth:`to_json` wrote.

        Raises:
            ValueError: ``value`` does not have that shape.
        """
        try:
            members = tuple(MemberReport(**m) for m in value["members"])
            return cls(
                pid=int(value["pid"]),
                started_time=float(value["started_time"]),
                updated_time=float(value["updated_time"]),
                heartbeat_s=float(value["heartbeat_s"]),
                members=members,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a launcher report: {exc}") from None

    def is_current(self, now: float) -> bool:
        """Whether the launcher that wrote it still runs and keeps it fresh."""
        if now - self.updated_time > max(10.0, 5 * self.heartbeat_s):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process of that id: it exists
        return True


def write_report(path: Path, report: LauncherReport) -> None:
    """Replace ``path`` with ``report`` at once, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(scratch, path)


def read_report(path: Path) -> LauncherReport | None:
    """The report at ``path``; None when there is none.

    Raises:
        ValueError: the file is not a launcher report.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LauncherReport.from_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None


def remove_report(path: Path) -> None:
    """Remove the report (the launcher stopped)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(slots=True)
class _Member:
    name: str
    address: str
    started_at: float
    up_since_time: float | None
    running: bool = True
    restarts: int = 0
    exits_in_a_row: int = 0
    crash_looping: bool = False
    restart_at: float | None = None
    last_exit: str = ""
    last_exit_code: int | None = None
    last_exit_time: float | None = None


class Supervisor:
    """Restarts members that exit; call :meth:`tick` often (the launcher: every 0.2 s)."""

    def __init__(
        self,
        processes: Processes,
        addresses: Mapping[str, str],
        *,
        policy: RestartPolicy | None = None,
        started_at: Mapping[str, float] | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        """Supervise the members named in ``addresses`` (name to ``host:port``), all running
        since ``started_at`` (on ``clock``; default: now)."""
        self.policy = policy or RestartPolicy()
        self._processes = processes
        self._clock = clock
        self._wall_clock = wall_clock
        self.started_time = wall = wall_clock()
        now = clock()
        since = started_at or {}
        self._members = {
            name: _Member(
                name=name,
                address=address,
                started_at=since.get(name, now),
                up_since_time=wall - (now - since.get(name, now)),
            )
            for name, address in addresses.items()
        }

    def tick(self) -> list[Transition]:
        """Notice exits, schedule their restarts, start the members whose delay is over."""
        now = self._clock()
        changes: list[Transition] = []
        for member in self._members.values():
            if member.running:
                code = self._processes.exit_code(member.name)
                if code is not None:
                    changes.append(self._exited(member, describe_exit(code), code, now))
                elif member.exits_in_a_row and now - member.started_at >= self.policy.stable_s:
                    changes.append(self._stable(member))
            elif member.restart_at is not None and now >= member.restart_at:
                changes.append(self._restart(member, now))
        return changes

    def crash_looping(self) -> list[str]:
        """Members crash-looping now."""
        return [m.name for m in self._members.values() if m.crash_looping]

    def running(self) -> list[str]:
        """Members whose process runs now (as of the last tick)."""
        return [m.name for m in self._members.values() if m.running]

    def report(self, *, pid: int | None = None, heartbeat_s: float = HEARTBEAT_S) -> LauncherReport:
        """Every member now, as ``launcher.json`` holds it."""
        now, wall = self._clock(), self._wall_clock()
        return LauncherReport(
            pid=os.getpid() if pid is None else pid,
            started_time=self.started_time,
            updated_time=wall,
            heartbeat_s=heartbeat_s,
            members=tuple(
                MemberReport(
                    name=m.name,
                    address=m.address,
                    pid=self._processes.pid(m.name),
                    running=m.running,
                    restarts=m.restarts,
                    last_exit=m.last_exit,
                    last_exit_code=m.last_exit_code,
                    last_exit_time=m.last_exit_time,
                    crash_looping=m.crash_looping,
                    next_restart_in_s=(
                        max(0.0, m.restart_at - now) if m.restart_at is not None else None
                    ),
                    up_since_time=m.up_since_time if m.running else None,
                )
                for m in self._members.values()
            ),
        )

    def _exited(self, member: _Member, reason: str, code: int | None, now: float) -> Transition:
        uptime = now - member.started_at
        if uptime >= self.policy.stable_s:
            member.exits_in_a_row = 0  # it had been stable: start the delays again
        member.exits_in_a_row += 1
        delay = self.policy.delay_s(member.exits_in_a_row)
        member.running = False
        member.restart_at = now + delay
        member.up_since_time = None
        member.last_exit, member.last_exit_code = reason, code
        member.last_exit_time = self._wall_clock()
        member.crash_looping = member.exits_in_a_row >= self.policy.crash_loop_exits
        if member.crash_looping:
            message = (
                f"CRASH-LOOPING: {member.name} exited ({reason}), {member.exits_in_a_row} exits "
                f"in a row without {self.policy.stable_s:g} s up in between; "
                f"restarting it in {delay:g} s"
            )
        else:
            message = (
                f"{member.name} exited ({reason}) after {uptime:.1f} s up; "
                f"restarting it in {delay:g} s"
            )
        return Transition(
            name=member.name,
            change=Change.EXITED,
            message=message,
            crash_looping=member.crash_looping,
        )

    def _restart(self, member: _Member, now: float) -> Transition:
        member.restarts += 1
        member.started_at = now
        member.restart_at = None
        try:
            self._processes.start_member(member.name)
        except OSError as exc:  # not even spawned: an exit at once
            return self._exited(member, f"cannot start: {exc}", None, now)
        member.running = True
        member.up_since_time = self._wall_clock()
        pid = self._processes.pid(member.name)
        return Transition(
            name=member.name,
            change=Change.RESTARTED,
            message=f"restarted {member.name} (restart {member.restarts}, pid {pid})",
            crash_looping=member.crash_looping,
        )

    def _stable(self, member: _Member) -> Transition:
        was_looping = member.crash_looping
        member.exits_in_a_row = 0
        member.crash_looping = False
        return Transition(
            name=member.name,
            change=Change.STABLE,
            message=(
                f"{member.name} stayed up {self.policy.stable_s:g} s"
                + ("; no longer crash-looping" if was_looping else "")
                + "; its restart delay is back to "
                + f"{self.policy.initial_backoff_s:g} s"
            ),
        )
