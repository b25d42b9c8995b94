"""Resumable work: a request runs as persisted steps that a replay or the recovery loop finishes.

:class:`StepRunner` is the one step driver: it runs a piece of work's remaining steps in its
own shielded task, one task per id, so a caller hanging up cannot stop a step midway and a
replay or a recovery pass joins the work instead of repeating it. :class:`RecoveryLoop` is the
one recovery scheduler: a pass at start and then whenever the next is due, resuming each
unfinished item, retrying an item that keeps failing with per-item jittered backoff, and
leaving an item alone while a hook says its dependency is down. :class:`StepStore` keeps one
row per piece of work (claimed with its request id, the step it has reached);
:class:`StepDriver` runs such records on the runner under the recovery loop (every
``<SERVICE>_RECOVERY_INTERVAL_S``; work stuck on an outage waits for the next pass instead of
racing a dependency that is still coming up), and stops the work in flight at close, leaving
the rows resumable. Settlement and withdrawal use the driver; the gateway's payments and
refunds run on the runner and the same recovery loop, configured with per-item backoff and a
breaker hook (``services/payment_gateway/recovery.py``). With replicas of a service on one
database, the runner drives a piece of work only under its lease
(:mod:`services.storage.leases`); a recovery pass leaves work a peer holds to that peer.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from interceptors.backoff import backoff_delay_s
from interceptors.policy import RetryPolicy
from services.mesh.bootstrap import StartupError
from services.mesh.errors import Aborted, NotFound
from services.mesh.topology import env_prefix
from services.storage import idempotency
from services.storage.leases import LeaseHeld, Leases, replica_id, work_key
from services.storage.sql import Database, Row, Statements

#: The step of finished work (the value each service's ``Step.DONE`` has).
DONE = "done"
#: Pause between two recovery passes unless ``<SERVICE>_RECOVERY_INTERVAL_S`` says otherwise.
DEFAULT_RECOVERY_INTERVAL_S = 10.0


def recovery_interval_s(service: str, environ: Mapping[str, str]) -> float:
    """``<SERVICE>_RECOVERY_INTERVAL_S`` of ``service``, else the default.

    Raises:
        StartupError: the value is not a positive number of seconds.
    """
    var = f"{env_prefix(service)}_RECOVERY_INTERVAL_S"
    raw = environ.get(var)
    if raw is None:
        return DEFAULT_RECOVERY_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise StartupError(f"{var}={raw!r}: must be a positive number of seconds")
    return value


class StepRecord(Protocol):
    """A stored piece of work: its id, the request id that created it and its next step."""

    @property
    def key(self) -> str:
        """The id of the work (its primary key)."""
        ...

    @property
    def request_id(self) -> str:
        """The request id that created it."""
        ...

    @property
    def step(self) -> str:
        """What is left to do; :data:`DONE` once nothing is."""
        ...


RecordT = TypeVar("RecordT", bound=StepRecord)
MessageT = TypeVar("MessageT", bound=Message)
#: Runs one step of a record and returns it as persisted after the step.
Stepper = Callable[[RecordT], Awaitable[RecordT]]


@dataclass(frozen=True, slots=True)
class Begun(Generic[RecordT]):
    """The outcome of a store's ``begin``."""

    record: RecordT
    """The work, new or existing."""
    replayed: bool
    """True when the request id had been seen: ``record`` is the earlier work."""


class StepStore(abc.ABC, Generic[RecordT, MessageT]):
    """One table of resumable work, idempotent by request id, on the store base.

    A subclass names its table, id column and method, turns a row into a record, and writes
    ``begin`` (its insert) and ``advance`` (its columns) with :meth:`_begin` and :meth:`_update`.
    The table has ``request_id``, ``merchant_id``, ``status``, ``step``, ``create_time_ns`` and
    ``update_time_ns`` columns.
    """

    table: ClassVar[str]
    """The table's name."""
    id_column: ClassVar[str]
    """Its primary key column, also the name of the id in errors."""
    method: ClassVar[str]
    """The RPC whose request ids it claims."""
    steps: ClassVar[tuple[str, ...]]
    """Every step value; the table's ``CHECK`` on ``step`` lists them all."""

    def __init__(
        self, path: Path | str, schema: str, *, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self._db = Database(path, schema, clock_ns=clock_ns)
        self._rebuild_if_steps_changed(schema)

    def _rebuild_if_steps_changed(self, schema: str) -> None:
        """Rebuild a table made by an older version whose ``CHECK`` lacks a step of this one.

        SQLite cannot alter a CHECK constraint: the rows move to a table made by ``schema``
        (its columns a superset of the old ones), in one transaction.
        """
        made = self._db.table_sql(self.table)
        if made is None or all(f"'{step}'" in made for step in self.steps):
            return
        columns = self._db.columns(self.table)
        self._db.rebuild(schema, {self.table: {column: column for column in columns}})

    def leases(self, owner: str | None = None) -> Leases:
        """The lease table of this store's database (a base table every database gets),
        claimed as ``owner`` (default: this process's :func:`replica_id`)."""
        return Leases(self._db, owner or replica_id(self.noun))

    @property
    def noun(self) -> str:
        """What one row is, for messages: ``settlement`` for ``settlement_id``."""
        return self.id_column.removesuffix("_id")

    @abc.abstractmethod
    def _record(self, row: Row) -> RecordT:
        """The record of a row."""

    @abc.abstractmethod
    def _message(self, record: RecordT) -> MessageT:
        """The API message of a record."""

    @abc.abstractmethod
    def _response(self, record: RecordT) -> Message:
        """The response a replay of the creating request returns."""

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def find(self, key: str) -> RecordT | None:
        """The record, or ``None`` if there is none."""
        row = self._row(key)
        return None if row is None else self._record(row)

    def get(self, key: str, *, merchant_id: str = "") -> RecordT:
        """The record; NotFound if there is none.

        Args:
            merchant_id: if given, another merchant's record is NotFound too, with the very
                error of a missing one, so the caller learns nothing about it.
        """
        return self._require(key, merchant_id=merchant_id)

    def abandon(self, record: RecordT) -> None:
        """Forget work the ledger refused before any effect, and free its request id."""
        with self._db.transaction() as tx:
            tx.run(f"DELETE FROM {self.table} WHERE {self.id_column} = ?", (record.key,))
            self._db.release(tx, self.method, record.request_id)

    def settle_claim(self, record: RecordT) -> None:
        """Mark the request id done, so replays return the work instead of ABORTED."""
        with self._db.transaction() as tx:
            self._db.complete(tx, self.method, record.request_id, self._response(record))

    def unfinished(self) -> list[RecordT]:
        """Work with steps left, oldest first (for the recovery passes)."""
        rows = self._db.all(
            f"SELECT * FROM {self.table} WHERE step != ? ORDER BY create_time_ns, {self.id_column}",
            [DONE],
        )
        return [self._record(row) for row in rows]

    def list(
        self, *, merchant_id: str, status: int, before: tuple[int, str] | None, limit: int
    ) -> list[MessageT]:
        """A merchant's work newest first, before the ``(create_time_ns, id)`` cursor."""
        where: dict[str, object] = {"merchant_id": merchant_id}
        if status:
            where["status"] = status
        rows = self._db.page(
            self.table,
            order=("create_time_ns", self.id_column),
            cursor=before,
            limit=limit,
            where=where,
        )
        return [self._message(self._record(row)) for row in rows]

    def _begin(
        self,
        request: Message,
        key: str,
        running: Callable[[str], bool],
        insert: Callable[[Statements, int], Mapping[str, object]],
    ) -> Begun[RecordT]:
        """Claim the request id and insert the work's row in one transaction.

        Args:
            key: the id of the work, derived from the request id.
            running: whether this process is still working on an id; an in-flight claim whose
                work is not running was interrupted and is handed back to resume.
            insert: checks the request against other rows (raising to refuse it) and returns
                the new row's columns, given the transaction and the time (ns); ``step``,
                ``request_id`` and the two times are filled in if absent.

        Raises:
            InvalidArgument: the request id was used with a different body.
            Aborted: the first request with this id is still being executed.
            AlreadyExists: the id's record expired but its work is kept.
        """
        request_id = idempotency.request_id_of(request)
        with self._db.transaction() as tx:
            try:
                # Only whether it is a replay matters: the record is the answer.
                replay = self._db.claim(
                    tx, self.method, request, Empty, kept_in=(self.table, "request_id")
                )
            except Aborted:
                existing = self._row(key)
                if existing is None or running(key):
                    raise
                return Begun(record=self._record(existing), replayed=True)
            if replay is not None:
                return Begun(record=self._require(key), replayed=True)
            now = self._db.clock_ns()
            row = {
                self.id_column: key,
                "request_id": request_id,
                "step": self.steps[0],
                "create_time_ns": now,
                "update_time_ns": now,
                **insert(tx, now),
            }
            tx.insert(self.table, row)
            return Begun(record=self._require(key), replayed=False)

    def _update(self, record: RecordT, *, step: str, **columns: object) -> RecordT:
        """Persist ``step`` and each column given a value (``None`` keeps the stored one)."""
        values = {"step": step, **{k: v for k, v in columns.items() if v is not None}}
        values["update_time_ns"] = self._db.clock_ns()
        with self._db.transaction() as tx:
            tx.update(self.table, values, **{self.id_column: record.key})
        return self._require(record.key)

    def _row(self, key: str) -> Row | None:
        return self._db.one(f"SELECT * FROM {self.table} WHERE {self.id_column} = ?", (key,))

    def _require(self, key: str, *, merchant_id: str = "") -> RecordT:
        row = self._row(key)
        if row is None or (merchant_id and row["merchant_id"] != merchant_id):
            raise NotFound(f"{self.noun} {key!r} does not exist", metadata={self.id_column: key})
        return self._record(row)


WorkT = TypeVar("WorkT")


class StepRunner(Generic[WorkT]):
    """Runs a piece of work's remaining steps in its own task, one task per id.

    The task is shielded from its caller: a caller hanging up cannot stop a step midway,
    and a second caller (a replay, a recovery pass) joins the task instead of running the
    same steps twice. Each step commits what it did before the next begins, so work stopped
    at close (or by a crash) resumes from its last committed step.

    With ``leases``, only the replica holding the work's lease (``<lease_prefix>/<id>``)
    drives it: the lease is claimed once, before the task starts (:class:`LeaseHeld` when a
    peer holds it), unless the caller says it claimed it already (``claimed``: in the
    transaction that created the work); it is renewed while the task runs and released when
    it ends, or by the step that finished the work (``done_releases``); a renewal that finds
    it taken stops the task (:class:`LeaseHeld` too).

    Args:
        load: the latest stored state of the work with an id.
        done: whether nothing is left to do.
        step_of: the step the work has reached (one that does not move ends the run: an
            outage, left for a replay or the next recovery pass).
        leases: the lease table, for work other replicas of the service may also drive.
        lease_prefix: what the work is (``payments``), the first part of its lease key.
        done_releases: the transaction that makes the work done also releases its lease
            (:meth:`Leases.release` with ``tx=``), so a run that finished it commits no
            release of its own. That step returns with no await after that commit (a
            renewal in between would claim the lease anew, and leave it to expire).
    """

    def __init__(
        self,
        *,
        load: Callable[[str], WorkT],
        done: Callable[[WorkT], bool],
        step_of: Callable[[WorkT], str],
        leases: Leases | None = None,
        lease_prefix: str = "work",
        done_releases: bool = False,
    ) -> None:
        self._load = load
        self._done = done
        self._step_of = step_of
        self._leases = leases
        self._lease_prefix = lease_prefix
        self._done_releases = done_releases
        self._work: dict[str, asyncio.Task[WorkT]] = {}

    def running(self, key: str) -> bool:
        """Whether a task is driving the work ``key`` right now."""
        return key in self._work

    async def run(
        self,
        key: str,
        step: Callable[[WorkT], Awaitable[WorkT]],
        *,
        then: Callable[[WorkT], None] | None = None,
        claimed: bool = False,
    ) -> WorkT:
        """Drive ``key`` to done (or until a step does not move) in its own task.

        Args:
            step: runs the work's next step and returns it as persisted after it.
            then: called in the task with the work as the run left it.
            claimed: the caller holds the work's lease already (claimed in the transaction
                that created it), so the run claims nothing.

        Raises:
            LeaseHeld: another replica drives it (or took it over midway).
            Exception: whatever a step raised (the work stays at its last committed step).
        """
        task = self._work.get(key)
        if task is None:
            if self._leases is not None and not claimed:  # before the task: nothing between
                self._leases.require(self.lease_key(key))
            task = asyncio.create_task(self._drive(key, step, then))
            self._work[key] = task
            task.add_done_callback(lambda finished: self._forget(key, finished))
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Stop the work in flight; it stays resumable from its last committed step."""
        tasks = list(self._work.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, key: str, task: asyncio.Task[WorkT]) -> None:
        self._work.pop(key, None)
        if not task.cancelled():
            task.exception()  # the awaiting caller reports it; do not log it as lost

    def lease_key(self, key: str) -> str:
        """The lease key of the work ``key``."""
        return work_key(self._lease_prefix, key)

    async def _drive(
        self,
        key: str,
        step: Callable[[WorkT], Awaitable[WorkT]],
        then: Callable[[WorkT], None] | None,
    ) -> WorkT:
        if self._leases is None:
            return (await self._steps(key, step, then))[0]
        lease = self.lease_key(key)
        task = asyncio.current_task()
        lost: list[bool] = []

        def taken_over() -> None:
            lost.append(True)
            if task is not None:
                task.cancel()

        try:
            # Claimed by run (or its caller) already: held only renews and releases it.
            async with self._leases.held(lease, on_lost=taken_over, claimed=True) as held:
                work, finished = await self._steps(key, step, then)
                if finished and self._done_releases:
                    held.released()  # by the commit of the step that finished it
                return work
        except asyncio.CancelledError:
            if lost:  # a peer drives it now; the last committed step is where it took over
                raise LeaseHeld(lease, "a peer that took it over") from None
            raise

    async def _steps(
        self,
        key: str,
        step: Callable[[WorkT], Awaitable[WorkT]],
        then: Callable[[WorkT], None] | None,
    ) -> tuple[WorkT, bool]:
        """The work as the run left it, and whether a step of this run made it done."""
        work = self._load(key)  # the latest state, not a caller's snapshot
        finished = False
        while not self._done(work):
            after = await step(work)
            stuck = self._step_of(after) == self._step_of(work)
            work = after
            finished = self._done(work)
            if stuck:
                break
        if then is not None:
            then(work)
        return work, finished


class Outcome(enum.Enum):
    """What resuming one item in a recovery pass came to."""

    FINISHED = "finished"
    """It reached a terminal state."""
    ABANDONED = "abandoned"
    """It was given up before any effect and forgotten."""
    PENDING = "pending"
    """It still has steps left (its dependency did not answer): retried after its backoff."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverySchedule:
    """How often recovery passes run and how patiently an item that keeps failing is retried.

    With both backoffs 0 (:meth:`passes_only`) an item that failed is simply retried by the
    next pass.
    """

    interval_s: float = 30.0
    """Longest pause between two passes (new unfinished items are found by the next one)."""
    initial_backoff_s: float = 1.0
    """Upper bound of the jittered wait after an item's first failed attempt."""
    max_backoff_s: float = 300.0
    """Cap of that bound, however often the item failed."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s <= 0:
            raise ValueError(
                f"interval_s must be a positive number of seconds, got {self.interval_s!r}"
            )
        for name in ("initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        if (self.initial_backoff_s == 0) != (self.max_backoff_s == 0):
            raise ValueError("initial_backoff_s and max_backoff_s are 0 together or not at all")

    @classmethod
    def passes_only(cls, interval_s: float) -> RecoverySchedule:
        """A pass every ``interval_s``, no per-item backoff."""
        return cls(interval_s=interval_s, initial_backoff_s=0.0, max_backoff_s=0.0)

    @property
    def backs_off(self) -> bool:
        """Whether an item that failed waits out a backoff before its next attempt."""
        return self.max_backoff_s > 0


@dataclass(slots=True)
class RecoveryReport:
    """What one pass did."""

    finished: int = 0
    """Items driven to a terminal state."""
    abandoned: int = 0
    """Items given up before any effect, forgotten."""
    pending: int = 0
    """Items tried and still unfinished (retried after their backoff, or by the next pass)."""
    waiting: int = 0
    """Items not tried: their dependency is down, their backoff has not passed, or another
    replica holds their lease."""

    @property
    def left(self) -> int:
        """Items still unfinished after the pass."""
        return self.pending + self.waiting


class Keyed(Protocol):
    """An item a recovery pass resumes: it has an id."""

    @property
    def key(self) -> str:
        """The id of the work."""
        ...


ItemT = TypeVar("ItemT", bound=Keyed)


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    due: float = -math.inf


class RecoveryLoop(Generic[ItemT]):
    """The one recovery scheduler: passes that resume every unfinished item, until close.

    A pass runs at :meth:`start` and then whenever the next is due: after the interval, or
    sooner when an item's backoff or wait ends. Two passes never run at once. Within a pass,
    an item ``busy`` says a live request is driving is left to it; an item whose backoff has
    not passed, or whose dependency ``wait_s`` says is down, waits without a call (a wait is
    no failure); every other item is resumed. One broken item does not stop the others: its
    error is logged and it is retried like a pending one. One summary line per pass that
    changed something; a pass that only waits again says it at debug.

    Args:
        unfinished: the items with steps left, oldest first; iterated lazily within the pass,
            so an item can be looked up just before it is resumed (skip one that is gone).
        resume: drives an item as far as it gets and says how far that was.
        log: the service's logger.
        what: what the items are, for messages (``settlements``).
        schedule: interval and per-item backoff.
        busy: whether a live request is driving an id right now (default: none is, and a
            pass joins such work through the step runner instead).
        wait_s: seconds until an item's dependency admits a call (0: now); default always 0.
        clock: monotonic time; rng: jitter in [0, 1); sleep: waits between passes.
    """

    def __init__(
        self,
        *,
        unfinished: Callable[[], Iterable[ItemT]],
        resume: Callable[[ItemT], Awaitable[Outcome]],
        log: logging.Logger,
        what: str,
        schedule: RecoverySchedule | None = None,
        busy: Callable[[str], bool] | None = None,
        wait_s: Callable[[ItemT], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._unfinished = unfinished
        self._resume = resume
        self._log = log
        self._what = what
        self.schedule = schedule or RecoverySchedule()
        self._busy = busy
        self._wait_s = wait_s
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._backoff: dict[str, _Backoff] = {}
        self._last = RecoveryReport()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run a pass now and then whenever the next is due, in the background, until close."""
        if self._task is None:
            self._task = asyncio.create_task(self.run_forever(), name=f"{self._what} recovery")

    async def close(self) -> None:
        """Stop the passes (the work they drive is stopped by its runner's close)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run_forever(self) -> None:
        """A pass now, then whenever the next is due, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass (the store, say) must not end recovery
                self._log.exception("%s recovery pass failed", self._what)
            await self._sleep(self.next_pass_in_s())

    def next_pass_in_s(self) -> float:
        """Seconds until the next pass is due: the interval, or sooner when a backoff ends."""
        wait = self.schedule.interval_s
        now = self._clock()
        for backoff in self._backoff.values():
            wait = min(wait, backoff.due - now)
        return max(0.0, wait)

    async def run_once(self) -> RecoveryReport:
        """One pass over the unfinished items."""
        report = RecoveryReport()
        async with self._lock:  # two passes at once would drive the same item twice
            seen: set[str] = set()
            for item in self._unfinished():
                seen.add(item.key)
                await self._one(item, report)
            for gone in set(self._backoff) - seen:
                del self._backoff[gone]
        self._report(report)
        return report

    async def _one(self, item: ItemT, report: RecoveryReport) -> None:
        key = item.key
        if self._busy is not None and self._busy(key):
            return
        now = self._clock()
        backoff = self._backoff.get(key)
        if backoff is not None and backoff.due > now:
            report.waiting += 1
            return
        wait_s = self._wait_s(item) if self._wait_s is not None else 0.0
        if wait_s > 0:
            # Its dependency is known to be down: no call, no failure counted; try once it
            # admits a call again.
            self._backoff.setdefault(key, _Backoff()).due = now + wait_s
            report.waiting += 1
            self._log.debug("recovery: %s waits %.1f s for its dependency", key, wait_s)
            return
        try:
            outcome = await self._resume(item)
        except LeaseHeld:  # another replica drives it: its work, no failure
            report.waiting += 1
            self._backoff.pop(key, None)
            return
        except Exception:  # one broken item must not stop the others
            self._log.exception("recovery of %s %s failed", self._what, key)
            outcome = Outcome.PENDING
        if outcome is Outcome.PENDING:
            report.pending += 1
            self._failed(key)
            return
        if outcome is Outcome.FINISHED:
            report.finished += 1
        else:
            report.abandoned += 1
        self._backoff.pop(key, None)

    def _failed(self, key: str) -> None:
        if not self.schedule.backs_off:
            self._backoff.pop(key, None)  # the next pass retries it
            return
        backoff = self._backoff.setdefault(key, _Backoff())
        backoff.failures += 1
        policy = RetryPolicy(
            initial_backoff_s=self.schedule.initial_backoff_s,
            max_backoff_s=self.schedule.max_backoff_s,
        )
        backoff.due = self._clock() + backoff_delay_s(policy, backoff.failures, self._rng)

    def _report(self, report: RecoveryReport) -> None:
        changed = report.finished or report.abandoned or report != self._last
        self._last = report
        if changed and (report.finished or report.abandoned or report.left):
            self._log.info("%s recovery pass: %s", self._what, report)
        else:
            self._log.debug("%s recovery pass: %s", self._what, report)


class StepDriver(Generic[RecordT]):
    """Runs records' remaining steps, one task per id, under the recovery loop.

    Args:
        store: where the records are persisted.
        steps: the step functions of each not-done step; ``first`` is True for a new request
            (whose first refusal may leave no trace).
        log: the service's logger.
        schedule: the recovery loop's pacing; by default a pass every
            :data:`DEFAULT_RECOVERY_INTERVAL_S` and no per-item backoff (a record still stuck
            on an outage waits for the next pass).
        wait_s: seconds until a record's dependency admits a call (see :class:`RecoveryLoop`).
        leases: whose lease a record's run holds (default: the store's lease table as this
            process's replica), so replicas of the service never drive one record at once.
        clock, rng: the recovery loop's time and jitter.
        sleep: waits between recovery passes (tests pass their own).
    """

    def __init__(
        self,
        store: StepStore[RecordT, Any],
        steps: Callable[[bool], Mapping[Any, Stepper[RecordT]]],
        *,
        log: logging.Logger,
        schedule: RecoverySchedule | None = None,
        wait_s: Callable[[RecordT], float] | None = None,
        leases: Leases | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._steps = steps
        self._runner: StepRunner[RecordT] = StepRunner(
            load=store.get,
            done=lambda record: record.step == DONE,
            step_of=_step_of,
            leases=leases or store.leases(),
            lease_prefix=store.table,
        )
        # A record a request is driving is joined through the runner, not skipped.
        self._recovery: RecoveryLoop[RecordT] = RecoveryLoop(
            unfinished=store.unfinished,
            resume=self._resume,
            log=log,
            what=f"{store.noun}s",
            schedule=schedule or RecoverySchedule.passes_only(DEFAULT_RECOVERY_INTERVAL_S),
            wait_s=wait_s,
            clock=clock,
            rng=rng,
            sleep=sleep,
        )

    def running(self, key: str) -> bool:
        """Whether this process is driving the work ``key`` right now."""
        return self._runner.running(key)

    async def run(self, record: RecordT, *, first: bool) -> RecordT:
        """Drive the record in its own task: a caller hanging up cannot stop it mid-step.

        At the end, the request id's claim is settled, so replays return the work.
        """
        steps = self._steps(first)

        async def step(current: RecordT) -> RecordT:
            return await steps[current.step](current)

        return await self._runner.run(record.key, step, then=self._store.settle_claim)

    def start_recovery(self, interval_s: float | None = None) -> None:
        """Run a recovery pass now and then every ``interval_s`` (else the schedule's), in
        the background, until close.

        Raises:
            ValueError: ``interval_s`` is not a positive number.
        """
        if interval_s is not None:
            self._recovery.schedule = replace(self._recovery.schedule, interval_s=interval_s)
        self._recovery.start()

    async def recover(self) -> int:
        """One pass: resume each unfinished record with its own ids; returns how many are left.

        A record still stuck on an outage, or failing, waits for the next pass; one that a
        request is driving right now is joined, not run twice.
        """
        return (await self._recovery.run_once()).left

    async def close(self) -> None:
        """Stop the recovery pass and the work in flight; their rows stay resumable."""
        await self._recovery.close()
        await self._runner.close()

    async def _resume(self, record: RecordT) -> Outcome:
        after = await self.run(record, first=False)
        return Outcome.FINISHED if after.step == DONE else Outcome.PENDING


def _step_of(record: StepRecord) -> str:
    return record.step
