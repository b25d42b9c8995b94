"""The launcher's supervision, stepped with a fake clock: restarts, backoff, crash loops, report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.tools.supervisor import (
    Change,
    LauncherReport,
    RestartPolicy,
    RestartPolicyError,
    Supervisor,
    Transition,
    describe_exit,
    read_report,
    remove_report,
    write_report,
)
from tests.unit.fakes import FakeClock

ADDRESSES = {"order-service": "127.0.0.1:40003", "risk-service": "127.0.0.1:40005"}


class FakeProcesses:
    """Members whose processes exit when told; ``start_member`` starts a new one."""

    def __init__(self) -> None:
        self.codes: dict[str, int | None] = dict.fromkeys(ADDRESSES)
        self.starts: dict[str, int] = dict.fromkeys(ADDRESSES, 0)
        self.refuse_start = False

    def start_member(self, name: str) -> object:
        if self.refuse_start:
            raise OSError(2, "No such file or directory")
        self.starts[name] += 1
        self.codes[name] = None
        return None

    def exit_code(self, name: str) -> int | None:
        return self.codes[name]

    def pid(self, name: str) -> int | None:
        return 1000 + self.starts[name]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def processes() -> FakeProcesses:
    return FakeProcesses()


@pytest.fixture
def supervisor(processes: FakeProcesses, clock: FakeClock) -> Supervisor:
    return Supervisor(processes, ADDRESSES, clock=clock, wall_clock=lambda: 1_700_000_000.0)


def _member(supervisor: Supervisor, name: str = "order-service") -> dict[str, object]:
    report = next(m for m in supervisor.report().members if m.name == name)
    return {
        "running": report.running,
        "restarts": report.restarts,
        "last_exit": report.last_exit,
        "crash_looping": report.crash_looping,
        "next_restart_in_s": report.next_restart_in_s,
    }


def _crash_and_restart(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> tuple[Transition, float]:
    """Let order-service exit at once; return the exit's transition and the delay it got."""
    processes.codes["order-service"] = 2
    [exited] = supervisor.tick()
    delay = _member(supervisor)["next_restart_in_s"]
    assert isinstance(delay, float)
    clock.advance(delay)
    [restarted] = supervisor.tick()
    assert restarted.change is Change.RESTARTED
    return exited, delay


def test_a_member_that_exits_is_restarted_after_one_second_and_the_rest_is_left_alone(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    clock.advance(300.0)
    processes.codes["order-service"] = -9

    [exited] = supervisor.tick()
    assert (exited.name, exited.change, exited.crash_looping) == (
        "order-service",
        Change.EXITED,
        False,
    )
    assert "SIGKILL" in exited.message
    clock.advance(0.999)
    assert supervisor.tick() == []
    clock.advance(0.001)
    [restarted] = supervisor.tick()

    assert restarted.change is Change.RESTARTED
    assert processes.starts == {"order-service": 1, "risk-service": 0}
    assert _member(supervisor) == {
        "running": True,
        "restarts": 1,
        "last_exit": "SIGKILL",
        "crash_looping": False,
        "next_restart_in_s": None,
    }


def test_restart_delay_doubles_from_one_second_up_to_thirty_while_it_keeps_exiting(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    delays = [_crash_and_restart(supervisor, processes, clock)[1] for _ in range(7)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_stable_minute_resets_the_delay_to_one_second(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    for _ in range(3):
        _crash_and_restart(supervisor, processes, clock)
    clock.advance(59.9)
    assert supervisor.tick() == []
    clock.advance(0.1)
    [stable] = supervisor.tick()
    assert stable.change is Change.STABLE
    assert "no longer crash-looping" in stable.message

    _, delay = _crash_and_restart(supervisor, processes, clock)

    assert delay == 1.0


def test_an_exit_after_a_stable_minute_counts_as_a_first_exit_even_between_ticks(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    _crash_and_restart(supervisor, processes, clock)
    _crash_and_restart(supervisor, processes, clock)
    clock.advance(61.0)  # up a minute, but no tick saw it running that long

    _, delay = _crash_and_restart(supervisor, processes, clock)

    assert delay == 1.0


def test_the_third_exit_in_a_row_is_crash_looping_and_it_is_still_restarted(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    first, _ = _crash_and_restart(supervisor, processes, clock)
    second, _ = _crash_and_restart(supervisor, processes, clock)
    third, delay = _crash_and_restart(supervisor, processes, clock)

    assert (first.crash_looping, second.crash_looping, third.crash_looping) == (False, False, True)
    assert third.message == (
        "CRASH-LOOPING: order-service exited (exit 2), 3 exits in a row without 60 s up "
        "in between; restarting it in 4 s"
    )
    assert delay == 4.0
    assert supervisor.crash_looping() == ["order-service"]
    assert processes.starts["order-service"] == 3
    assert _member(supervisor)["crash_looping"] is True  # until it stays up a minute


def test_crash_looping_after_the_configured_number_of_exits(
    processes: FakeProcesses, clock: FakeClock
) -> None:
    supervisor = Supervisor(
        processes, ADDRESSES, policy=RestartPolicy(crash_loop_exits=1), clock=clock
    )

    exited, _ = _crash_and_restart(supervisor, processes, clock)

    assert exited.crash_looping


def test_a_restart_that_cannot_spawn_counts_as_an_exit_at_once(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock
) -> None:
    processes.codes["order-service"] = 1
    supervisor.tick()
    processes.refuse_start = True
    clock.advance(1.0)

    [failed] = supervisor.tick()

    assert failed.change is Change.EXITED
    member = _member(supervisor)
    assert member["last_exit"] == "cannot start: [Errno 2] No such file or directory"
    assert (member["running"], member["restarts"], member["next_restart_in_s"]) == (False, 1, 2.0)


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exit 0"), (2, "exit 2"), (-9, "SIGKILL"), (-15, "SIGTERM"), (-200, "signal 200")],
)
def test_an_exit_reads_as_its_code_or_signal_name(code: int, text: str) -> None:
    assert describe_exit(code) == text


def test_restart_policy_defaults_are_kubernetes_like() -> None:
    policy = RestartPolicy()

    assert (policy.initial_backoff_s, policy.max_backoff_s, policy.stable_s) == (1.0, 30.0, 60.0)
    assert policy.crash_loop_exits == 3


def test_restart_policy_reads_the_environment() -> None:
    policy = RestartPolicy.from_environ(
        {
            "PAYMESH_RESTART_BACKOFF_S": "0.5",
            "PAYMESH_RESTART_MAX_BACKOFF_S": "4",
            "PAYMESH_RESTART_STABLE_S": "10",
            "PAYMESH_CRASH_LOOP_EXITS": "5",
        }
    )

    assert policy == RestartPolicy(
        initial_backoff_s=0.5, max_backoff_s=4.0, stable_s=10.0, crash_loop_exits=5
    )
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYMESH_RESTART_BACKOFF_S", "soon"),
        ("PAYMESH_RESTART_BACKOFF_S", "0"),
        ("PAYMESH_RESTART_MAX_BACKOFF_S", "0.5"),  # below the first delay
        ("PAYMESH_CRASH_LOOP_EXITS", "2.5"),
    ],
)
def test_a_bad_restart_setting_is_refused_naming_it(variable: str, value: str) -> None:
    with pytest.raises(RestartPolicyError, match=variable):
        RestartPolicy.from_environ({variable: value})


def test_the_report_survives_the_file_and_names_every_member(
    supervisor: Supervisor, processes: FakeProcesses, clock: FakeClock, tmp_path: Path
) -> None:
    _crash_and_restart(supervisor, processes, clock)
    path = tmp_path / "launcher.json"

    write_report(path, supervisor.report(pid=os.getpid()))
    read = read_report(path)

    assert read == supervisor.report(pid=os.getpid())
    assert read is not None and [m.name for m in read.members] == list(ADDRESSES)
    assert [p.name for p in tmp_path.iterdir()] == ["launcher.json"]  # no scratch file left
    remove_report(path)
    assert read_report(path) is None


def test_a_report_is_stale_once_its_launcher_is_gone_or_it_stopped_updating() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    fresh = LauncherReport(pid=os.getpid(), started_time=0.0, updated_time=100.0, heartbeat_s=2.0)

    assert fresh.is_current(105.0)
    assert not fresh.is_current(111.0)  # five heartbeats and at least 10 s without an update
    dead = LauncherReport(
        pid=int(gone.stdout), started_time=0.0, updated_time=100.0, heartbeat_s=2.0
    )
    assert not dead.is_current(100.0)


def test_a_file_that_is_not_a_report_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "launcher.json"
    path.write_text('{"pid": 1}')

    with pytest.raises(ValueError, match="not a launcher report"):
        read_report(path)


def test_the_uptime_of_the_first_processes_counts_from_their_start(
    processes: FakeProcesses, clock: FakeClock
) -> None:
    supervisor = Supervisor(
        processes, ADDRESSES, started_at={"order-service": clock.now - 59.0}, clock=clock
    )
    processes.codes["order-service"] = -9
    clock.advance(2.0)

    [exited] = supervisor.tick()

    assert "after 61.0 s up" in exited.message
