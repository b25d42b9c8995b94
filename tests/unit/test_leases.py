"""Leases: one owner at a time, renewed by it, taken over by a peer once expired."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.storage import leases
from services.storage.leases import LeaseHeld, Leases, lease_s_from, replica_id
from services.storage.resumable import StepRunner
from services.storage.sql import Database, Target


class Clock:
    """Nanoseconds a test advances."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def two_replicas(path: Target, clock: Clock, lease_s: float = 10.0) -> tuple[Leases, Leases]:
    """Two owners on one database (either engine), each with its own connection, as two
    processes."""
    a = Database(path, leases.SCHEMA, clock_ns=clock)
    b = Database(path, leases.SCHEMA, clock_ns=clock)
    return Leases(a, "gateway@a", lease_s=lease_s), Leases(b, "gateway@b", lease_s=lease_s)


def test_a_held_lease_refuses_a_peer_until_it_expires(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)
    assert a.claim("payments/p1")
    assert not b.claim("payments/p1")
    clock.advance(9.9)
    assert not b.claim("payments/p1")
    clock.advance(0.2)
    assert b.claim("payments/p1")
    assert not a.claim("payments/p1")  # the stalled owner finds it taken over
    holder = a.holder("payments/p1")
    assert holder is not None and holder.owner == "gateway@b"


def test_renewal_keeps_the_lease_past_its_first_period(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)
    assert a.claim("k")
    for _ in range(5):
        clock.advance(6)
        assert a.claim("k")
        assert not b.claim("k")


def test_release_lets_a_peer_claim_at_once(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)
    assert a.claim("k")
    b.release("k")  # not b's: nothing happens
    assert not b.claim("k")
    a.release("k")
    assert a.holder("k") is None
    assert b.claim("k")


def test_require_names_the_holder(database_target: Callable[[str], Target], clock: Clock) -> None:
    a, b = two_replicas(database_target("db"), clock)
    a.require("outbox/order-service")
    with pytest.raises(LeaseHeld, match="gateway@a"):
        b.require("outbox/order-service")


def test_replica_id_names_service_host_and_process() -> None:
    owner = replica_id("payment-gateway")
    assert owner.startswith("payment-gateway@")
    assert owner == replica_id("payment-gateway")


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "7200"])
def test_bad_lease_period_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=f"PAYMESH_LEASE_S='{raw}'"):
        lease_s_from({"PAYMESH_LEASE_S": raw})


def test_lease_period_defaults_to_fifteen_seconds() -> None:
    assert lease_s_from({}) == 15.0


async def test_step_runner_refuses_work_a_peer_holds(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)
    ran: list[str] = []

    async def step(work: str) -> str:
        ran.append(work)
        return "done"

    runner = StepRunner(load=lambda key: "start", done=lambda w: w == "done", step_of=str, leases=b)
    assert a.claim("work/w1")
    with pytest.raises(LeaseHeld):
        await runner.run("w1", step)
    assert ran == []
    a.release("work/w1")
    assert await runner.run("w1", step) == "done"
    assert b.holder("work/w1") is None  # released when the run ended


async def test_step_runner_stops_when_its_lease_is_taken_over(
    database_target: Callable[[str], Target],
) -> None:
    # A real clock: the renewal runs in the background every third of the (short) period.
    path = database_target("db")
    ours = Leases(Database(path, leases.SCHEMA), "gateway@a", lease_s=0.3)
    peer = Database(path, leases.SCHEMA)
    started = asyncio.Event()

    async def step(work: str) -> str:
        started.set()
        await asyncio.Event().wait()  # a step that stalls
        return "done"

    runner = StepRunner(
        load=lambda key: "start", done=lambda w: w == "done", step_of=str, leases=ours
    )
    run = asyncio.create_task(runner.run("w1", step))
    await started.wait()
    # The peer takes it over, as after this replica stalled past its period.
    with peer.transaction() as tx:
        tx.run("UPDATE leases SET owner = ?, until_ns = until_ns + ?", ("gateway@b", 10**12))
    with pytest.raises(LeaseHeld):
        await asyncio.wait_for(run, timeout=5)


def _owner_of(pid: int, host: str | None = None) -> str:
    return f"payment-gateway@{host or socket.gethostname()}:{pid}:0bad"


def test_a_lease_of_a_process_of_this_host_that_is_gone_is_taken_over_at_once(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)
    path = database_target("db")
    crashed = Leases(Database(path, leases.SCHEMA, clock_ns=clock), _owner_of(dead_pid))
    restarted = Leases(Database(path, leases.SCHEMA, clock_ns=clock), replica_id("gateway"))
    assert crashed.claim("payments/p1")
    assert restarted.claim("payments/p1")  # no wait for the period to run out
    holder = restarted.holder("payments/p1")
    assert holder is not None and holder.owner == restarted.owner


def test_a_lease_of_a_live_process_or_of_another_host_waits_for_its_period(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    path = database_target("db")
    peer = Leases(Database(path, leases.SCHEMA, clock_ns=clock), replica_id("gateway"))
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            for owner in (_owner_of(alive.pid), _owner_of(1, host="another-host"), "unparsable"):
                holder = Leases(Database(path, leases.SCHEMA, clock_ns=clock), owner)
                key = f"payments/{owner}"
                assert holder.claim(key)
                assert not peer.claim(key), owner
        finally:
            alive.kill()


def test_a_killed_process_not_yet_reaped_counts_as_gone() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        child.send_signal(signal.SIGKILL)
        # Not waited for: a zombie until its parent reaps it, as a crashed member can be.
        deadline = time.monotonic() + 10
        while "Z" not in Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1][:3]:
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert leases.died_on_this_host(_owner_of(child.pid))
    assert leases.died_on_this_host(_owner_of(child.pid))  # reaped: no such process at all


def test_a_claim_in_the_callers_transaction_commits_and_rolls_back_with_its_writes(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    path = database_target("db")
    db = Database(path, leases.SCHEMA + "CREATE TABLE work (id TEXT PRIMARY KEY);", clock_ns=clock)
    a = Leases(db, "gateway@a", lease_s=10)
    _, b = two_replicas(path, clock)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.insert("work", {"id": "w1"})
        assert a.claim("work/w1", tx=tx)
        raise RuntimeError("the creating transaction fails")
    assert a.holder("work/w1") is None and db.one("SELECT id FROM work") is None
    assert b.claim("work/w1")  # nothing was left held
    b.release("work/w1")

    with db.transaction() as tx:
        tx.insert("work", {"id": "w2"})
        a.require("work/w2", tx=tx)
    # One commit made the work and leased it: a peer finds it held from the first moment.
    with pytest.raises(LeaseHeld, match="gateway@a"):
        b.require("work/w2")
    with db.transaction() as tx:
        tx.run("DELETE FROM work WHERE id = ?", ("w2",))
        a.release("work/w2", tx=tx)
    assert b.claim("work/w2")


def test_require_in_a_transaction_refuses_a_held_lease_and_rolls_the_writes_back(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    path = database_target("db")
    db = Database(path, leases.SCHEMA + "CREATE TABLE work (id TEXT PRIMARY KEY);", clock_ns=clock)
    a = Leases(db, "gateway@a", lease_s=10)
    _, b = two_replicas(path, clock)
    assert b.claim("work/w1")
    with pytest.raises(LeaseHeld, match="gateway@b"), db.transaction() as tx:
        tx.insert("work", {"id": "w1"})
        a.require("work/w1", tx=tx)
    assert db.one("SELECT id FROM work") is None


async def test_a_run_on_a_lease_its_caller_claimed_claims_nothing_and_its_last_step_frees_it(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)
    assert a.claim("work/w1")  # as the transaction that created the work claims it
    claimed_until = a.holder("work/w1")
    clock.advance(4)
    seen: list[object] = []

    async def step(work: str) -> str:
        seen.append(a.holder("work/w1"))
        a.release("work/w1")  # as the finishing transaction does (release with tx=)
        return "done"

    runner = StepRunner(
        load=lambda key: "start",
        done=lambda w: w == "done",
        step_of=str,
        leases=a,
        done_releases=True,
    )
    assert await runner.run("w1", step, claimed=True) == "done"
    assert seen == [claimed_until]  # the run did not claim it again (its until is unchanged)
    assert a.holder("work/w1") is None
    assert b.claim("work/w1")


async def test_a_run_that_leaves_the_work_unfinished_releases_its_lease_at_the_end(
    database_target: Callable[[str], Target], clock: Clock
) -> None:
    a, b = two_replicas(database_target("db"), clock)

    async def step(work: str) -> str:
        return work  # an outage: the step did not move

    for done_releases in (False, True):
        runner = StepRunner(
            load=lambda key: "start",
            done=lambda w: w == "done",
            step_of=str,
            leases=a,
            done_releases=done_releases,
        )
        assert await runner.run("w1", step) == "start"
        assert a.holder("work/w1") is None, done_releases
    # Work that was done before the run started: its run released the lease it claimed.
    runner = StepRunner(
        load=lambda key: "done",
        done=lambda w: w == "done",
        step_of=str,
        leases=a,
        done_releases=True,
    )
    assert await runner.run("w1", step) == "done"
    assert a.holder("work/w1") is None
    assert b.claim("work/w1")


def _commits(db: Database) -> list[str]:
    """The commits of a SQLite database from now on: each COMMIT and each write outside a
    transaction (an autocommit), seen by sqlite3's statement trace."""
    conn = db._session.conn  # type: ignore[attr-defined]  # the SQLite session's connection
    seen: list[str] = []

    def trace(sql: str) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if verb == "COMMIT" or (verb in ("INSERT", "UPDATE", "DELETE") and not conn.in_transaction):
            seen.append(sql)

    conn.set_trace_callback(trace)
    return seen


async def test_a_run_claims_its_lease_once_and_releases_it_once(tmp_path: Path) -> None:
    db = Database(tmp_path / "db", leases.SCHEMA)
    ours = Leases(db, "gateway@a", lease_s=10)

    async def step(work: str) -> str:
        return "done"

    runner = StepRunner(
        load=lambda key: "start", done=lambda w: w == "done", step_of=str, leases=ours
    )
    commits = _commits(db)
    assert await runner.run("w1", step) == "done"
    assert len(commits) == 2  # the claim and the release, no second claim in between
    commits.clear()
    # Claimed by its caller and released by its finishing step: the run commits nothing.
    finishing = StepRunner(
        load=lambda key: "start",
        done=lambda w: w == "done",
        step_of=str,
        leases=ours,
        done_releases=True,
    )
    assert ours.claim("work/w2")
    commits.clear()

    async def finish(work: str) -> str:
        ours.release("work/w2")
        return "done"

    assert await finishing.run("w2", finish, claimed=True) == "done"
    assert len(commits) == 1  # only the finishing step's own


async def test_every_held_lease_is_renewed_before_it_expires_and_released_at_the_end(
    database_target: Callable[[str], Target],
) -> None:
    # A real clock: three leases held at once, renewed by the one renewal timer.
    path = database_target("db")
    ours = Leases(Database(path, leases.SCHEMA), "gateway@a", lease_s=0.3)
    peer = Leases(Database(path, leases.SCHEMA), "gateway@b", lease_s=0.3)
    keys = [f"work/w{i}" for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for key in keys:
            await stack.enter_async_context(ours.held(key))
            await asyncio.sleep(0.05)  # taken at different times: due at different times
        first = {key: ours.holder(key) for key in keys}
        await asyncio.sleep(0.9)  # three periods: each expired twice over unless renewed
        for key in keys:
            holder = ours.holder(key)
            was = first[key]
            assert holder is not None and was is not None
            assert holder.owner == "gateway@a" and holder.until_ns > was.until_ns
            assert not peer.claim(key)
    for key in keys:
        assert ours.holder(key) is None
        assert peer.claim(key)
