"""A transactional outbox: messages committed with the state change that causes them, then relayed.

A store writes each message as a row of ``outbox`` inside the very transaction that commits
the change (so a crash can never keep the change and lose the message, or the reverse), with
a stable event id that is the request id at the destination. :class:`OutboxRelay` sends the
rows: one worker per destination, woken by :meth:`OutboxRelay.kick` after a commit (at most
once per ``gather_s`` while it has rows to send, so a busy gateway's rows go in batches) and
by its own timer, retrying failures with exponential backoff and jitter until the destination takes
the message (at-least-once; the destination dedupes by the request id). A destination's due
rows of one method go in one call of its batch method where it has one (``RecordEvents``,
...: up to 64 rows, one result per row), else one call per row. With replicas of the
gateway on one database, a destination's rows are sent by the replica holding its lease
(``outbox/<destination>``, :mod:`services.storage.leases`), renewed at every look.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import propagate

from interceptors.backoff import backoff_delay_s
from interceptors.codes import DEFINITE
from interceptors.errors import AlreadyExistsError, CallError, NotFoundError, UnknownError
from interceptors.policy import RetryPolicy
from interceptors.tracing import TraceFields
from paymesh.common.v1 import common_pb2
from services.mesh.batch import MAX_BATCH_ITEMS, item_error
from services.storage.leases import Leases
from services.storage.sql import Database, Row, Statements, ns_to_seconds, seconds_to_ns

log = logging.getLogger("paymesh.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    target TEXT NOT NULL,
    method TEXT NOT NULL,
    flow_id TEXT NOT NULL,
    request BLOB NOT NULL,
    trace_context TEXT NOT NULL DEFAULT '{}',
    missing_ok INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'refused')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_time_ns INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    create_time_ns INTEGER NOT NULL,
    done_time_ns INTEGER NOT NULL DEFAULT 0,
    UNIQUE (event_id, method)
);
CREATE INDEX IF NOT EXISTS outbox_pending
    ON outbox (target, next_attempt_time_ns, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_by_flow ON outbox (flow_id);
CREATE INDEX IF NOT EXISTS outbox_done ON outbox (done_time_ns) WHERE state != 'pending';
"""

PENDING, SENT, REFUSED = "pending", "sent", "refused"
#: Answers that can never change for the same request: the row is given up (and logged).
#: Anything else (UNAVAILABLE, DEADLINE_EXCEEDED, but also PERMISSION_DENIED or UNIMPLEMENTED,
#: which an operator or a deploy fixes) is retried: an event must not be lost to a misconfiguration.
REFUSED_CODES = DEFINITE
#: Answers to a batch call as a whole that say the destination does not take the batch (an
#: older deploy, a topology without its grant): its rows are sent one by one instead.
BATCH_NOT_TAKEN = frozenset({"UNIMPLEMENTED", "PERMISSION_DENIED"})
#: Bytes of a delivery error kept on the row.
MAX_ERROR_CHARS = 500
#: Writes the trace context a row carries (``traceparent`` directly in the common case).
_TRACE_FIELDS = TraceFields()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    """One message to write with a state change."""

    event_id: str
    """Stable id of the event; the request id of the call at the destination."""
    target: str
    """Mesh name of the destination service."""
    method: str
    """Full gRPC method path (``/pkg.Service/Method``) the relay calls."""
    request: Message
    """The request, sent byte for byte the same on every attempt."""
    missing_ok: bool = False
    """NOT_FOUND means there is nothing left to change (a cleanup): it counts as delivered."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row of ``outbox``, its times in seconds (the relay's clock)."""

    seq: int
    event_id: str
    target: str
    method: str
    flow_id: str
    request: bytes
    trace_context: str
    missing_ok: int
    state: str
    attempts: int
    next_attempt_time: float
    last_error: str
    create_time: float
    done_time: float

    @classmethod
    def of(cls, row: Row) -> OutboxRow:
        """The row as stored (times in nanoseconds)."""
        return cls(
            seq=row["seq"],
            event_id=row["event_id"],
            target=row["target"],
            method=row["method"],
            flow_id=row["flow_id"],
            request=row["request"],
            trace_context=row["trace_context"],
            missing_ok=row["missing_ok"],
            state=row["state"],
            attempts=row["attempts"],
            next_attempt_time=ns_to_seconds(row["next_attempt_time_ns"]),
            last_error=row["last_error"],
            create_time=ns_to_seconds(row["create_time_ns"]),
            done_time=ns_to_seconds(row["done_time_ns"]),
        )


class Outbox:
    """The ``outbox`` table of one store's database (its connection, its clock in seconds)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self.retries_scheduled = 0
        """How many times :meth:`retry_later` put a row off (rows are otherwise due when
        written): a relay that saw nothing pending knows nothing is due later until it moves."""

    def _now_ns(self) -> int:
        return seconds_to_ns(self._clock())

    def add(self, tx: Statements, flow_id: str, messages: Iterable[OutboxMessage]) -> None:
        """Write ``messages`` inside the caller's open transaction; a message already written
        (same event id and method) is kept as it is.

        The current trace context is stored with each row, so the relay's calls continue the
        trace of the request that caused them.
        """
        carrier: dict[str, str] = {}
        _TRACE_FIELDS.inject(carrier, otel_context.get_current())
        trace_context = json.dumps(carrier, sort_keys=True)
        now = self._now_ns()
        tx.insert_many(
            "outbox",
            [
                {
                    "event_id": m.event_id,
                    "target": m.target,
                    "method": m.method,
                    "flow_id": flow_id,
                    "request": m.request.SerializeToString(deterministic=True),
                    "trace_context": trace_context,
                    "missing_ok": int(m.missing_ok),
                    "next_attempt_time_ns": now,
                    "create_time_ns": now,
                }
                for m in messages
            ],
            unless_exists=True,
        )

    def due(self, target: str, *, limit: int) -> list[OutboxRow]:
        """Undelivered rows of ``target`` whose next attempt is due, in the order written."""
        rows = self._db.all(
            "SELECT * FROM outbox WHERE target = ? AND state = ? AND next_attempt_time_ns <= ?"
            " ORDER BY seq LIMIT ?",
            (target, PENDING, self._now_ns(), limit),
        )
        return [OutboxRow.of(row) for row in rows]

    def next_attempt_time(self, target: str) -> float | None:
        """When the earliest undelivered row of ``target`` is due, None if there is none."""
        row = self._db.aggregate(
            "SELECT MIN(next_attempt_time_ns) AS t FROM outbox WHERE target = ? AND state = ?",
            (target, PENDING),
        )
        return None if row["t"] is None else ns_to_seconds(row["t"])

    def delivered(self, seq: int) -> None:
        """The destination took the row's message."""
        self._done(seq, SENT, "")

    def delivered_many(self, seqs: Iterable[int]) -> None:
        """The destination took these rows' messages: one write for them all."""
        batch = list(seqs)
        if not batch:
            return
        self._db.run(
            "UPDATE outbox SET state = ?, last_error = '', done_time_ns = ?,"
            f" attempts = attempts + 1 WHERE seq IN ({', '.join('?' for _ in batch)})",
            (SENT, self._now_ns(), *batch),
        )

    def refused(self, seq: int, error: str) -> None:
        """The destination refused the message for good; it is not sent again."""
        self._done(seq, REFUSED, error)

    def retry_later(self, seq: int, *, at: float, error: str) -> None:
        """Count a failed attempt and schedule the next one."""
        self.retries_scheduled += 1
        self._db.run(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_time_ns = ?, last_error = ?"
            " WHERE seq = ?",
            (seconds_to_ns(at), error[:MAX_ERROR_CHARS], seq),
        )

    def rows(self, *, flow_id: str | None = None, state: str | None = None) -> list[OutboxRow]:
        """Rows in the order written, optionally of one payment or refund and one state."""
        clauses: list[str] = []
        params: list[object] = []
        if flow_id is not None:
            clauses.append("flow_id = ?")
            params.append(flow_id)
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        found = self._db.all(f"SELECT * FROM outbox{where} ORDER BY seq", params)
        return [OutboxRow.of(row) for row in found]

    def summary(self) -> dict[str, Any]:
        """Per destination: rows waiting, the oldest, most attempts, next attempt, last error;
        and how many rows were refused for good (an operator's view of delivery)."""
        targets: dict[str, Any] = {}
        for row in self._db.all(
            "SELECT target, COUNT(*) AS n, MIN(create_time_ns) AS oldest,"
            " MAX(attempts) AS attempts, MIN(next_attempt_time_ns) AS next"
            " FROM outbox WHERE state = ? GROUP BY target",
            (PENDING,),
        ):
            last = self._db.one(
                "SELECT last_error FROM outbox WHERE target = ? AND state = ? AND last_error != ''"
                " ORDER BY seq LIMIT 1",
                (row["target"], PENDING),
            )
            targets[row["target"]] = {
                "pending": row["n"],
                "oldest_create_time": ns_to_seconds(row["oldest"]),
                "max_attempts": row["attempts"],
                "next_attempt_time": ns_to_seconds(row["next"]),
                "last_error": last["last_error"] if last else "",
            }
        refused = self._db.aggregate(
            "SELECT COUNT(*) AS n FROM outbox WHERE state = ?", (REFUSED,)
        )["n"]
        return {"pending": targets, "refused": refused}

    def purge(self, *, before: float, limit: int = 1000) -> int:
        """Delete at most ``limit`` delivered or refused rows finished before ``before``."""
        return self._db.run(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox"
            " WHERE state != ? AND done_time_ns < ? LIMIT ?)",
            (PENDING, seconds_to_ns(before), limit),
        )

    def _done(self, seq: int, state: str, error: str) -> None:
        self._db.run(
            "UPDATE outbox SET state = ?, last_error = ?, done_time_ns = ?,"
            " attempts = attempts + 1 WHERE seq = ?",
            (state, error[:MAX_ERROR_CHARS], self._now_ns(), seq),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayPolicy:
    """How the relay paces its deliveries and retries."""

    interval_s: float = 5.0
    """Longest sleep of a worker between two looks at its rows (commits wake it at once)."""
    initial_backoff_s: float = 0.5
    """Upper bound of the jittered pause after a destination's first failure."""
    max_backoff_s: float = 60.0
    """Cap of that bound, however long the destination has been failing."""
    batch: int = 100
    """Rows a worker reads at once."""
    batch_items: int = MAX_BATCH_ITEMS
    """Most rows one batch call carries (a destination takes at most 64); 1 sends each row
    in a call of its own."""
    batch_bytes: int = 192 * 1024
    """Most request bytes one batch call carries, below the servers' 256 KiB message bound."""
    retention_s: float = 7 * 24 * 3600.0
    """How long delivered and refused rows are kept (for audit) before they are purged."""
    purge_interval_s: float = 600.0
    """Least time between two purges."""
    gather_s: float = 0.05
    """Least time between the starts of two passes of a worker woken by commits: the rows of
    the payments committed meanwhile go in one batch call instead of one call each (a quiet
    destination's first row still goes at once); 0 sends at every commit."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "initial_backoff_s", "max_backoff_s", "retention_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        if self.batch < 1:
            raise ValueError(f"batch must be positive, got {self.batch}")
        if not 1 <= self.batch_items <= MAX_BATCH_ITEMS:
            raise ValueError(f"batch_items must be 1 to {MAX_BATCH_ITEMS}, got {self.batch_items}")
        if self.batch_bytes < 1:
            raise ValueError(f"batch_bytes must be positive, got {self.batch_bytes}")
        if not math.isfinite(self.purge_interval_s) or self.purge_interval_s < 0:
            raise ValueError(f"purge_interval_s must be >= 0, got {self.purge_interval_s!r}")
        if not math.isfinite(self.gather_s) or not 0 <= self.gather_s <= self.interval_s:
            raise ValueError(f"gather_s must be from 0 to interval_s, got {self.gather_s!r}")


@dataclass(frozen=True, slots=True)
class BatchRoute:
    """How the relay sends several rows of one method in one call of its batch method."""

    request: Callable[[list[Any]], Message]
    """The batch request of the rows' single requests (``RecordEventsRequest(events=...)``)."""
    send: Callable[[Any], Awaitable[Any]]
    """The batch stub method; its response has ``results``, one per request, in order."""


@dataclass(frozen=True, slots=True)
class Route:
    """How the relay sends the rows of one method."""

    target: str
    """Mesh name of the destination (one worker per destination)."""
    request_type: type[Message]
    """The request message the rows hold."""
    send: Callable[[Any], Awaitable[object]]
    """The stub method (through the client chain, with its timeout and retries)."""
    batch: BatchRoute | None = None
    """The destination's batch method for these rows, if it has one."""


class OutboxRelay:
    """Sends outbox rows to their destinations, forever, at least once.

    Each destination has its own worker, so one that hangs delays nobody else's messages.
    A worker sends its due rows in the order written, those of a method with a batch route
    in calls of up to ``batch_items`` rows (each row marked by its own result: delivered,
    refused for good, or retried), and marks a pass's delivered rows in
    one write (a crash before it only sends them again: delivery is at least once, and each
    destination dedupes by the event id). A batch call that fails as a whole counts as one
    failure of each of its rows; one the destination does not take (UNIMPLEMENTED,
    PERMISSION_DENIED, a definite refusal) is sent row by row. After a failure it pauses the whole
    destination with exponential backoff and full jitter (doubling per consecutive failure
    up to ``max_backoff_s``), so a destination that is down sees one attempt per pause, not
    one per waiting row. It logs the first failure and the recovery, not every attempt.
    With ``leases``, a worker sends only while this replica holds its destination's lease
    (claimed or renewed at most every third of the lease period; a peer's worker takes over
    within a lease period and a third of a dead holder).
    """

    def __init__(
        self,
        outbox: Outbox,
        routes: Mapping[str, Route],
        *,
        policy: RelayPolicy | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        leases: Leases | None = None,
    ) -> None:
        self._outbox = outbox
        self._leases = leases
        self._routes = dict(routes)
        self._policy = policy or RelayPolicy()
        self._schedule = RetryPolicy(
            initial_backoff_s=self._policy.initial_backoff_s,
            max_backoff_s=self._policy.max_backoff_s,
        )
        self._clock = clock
        self._rng = rng
        self._targets = sorted({route.target for route in self._routes.values()})
        self._kicks = {target: asyncio.Event() for target in self._targets}
        self._failures = dict.fromkeys(self._targets, 0)
        #: Rows of the batch in hand that their destination took, marked at the batch's end.
        self._sent: dict[str, list[int]] = {target: [] for target in self._targets}
        self._paused_until = dict.fromkeys(self._targets, 0.0)
        self._purged_at = -math.inf
        #: Per destination, whether this replica holds its lease and until when that stands.
        self._lease_answer: dict[str, tuple[bool, float]] = {}
        #: Per destination, whether its last pass found rows to send (then the next waits
        #: out the gather window).
        self._found = dict.fromkeys(self._targets, False)
        #: Per destination, :attr:`Outbox.retries_scheduled` when a look found no pending row
        #: of it (None: not known). While it stands, a pass that sent every due row left none
        #: due later either, so it does not look for the next attempt time.
        self._none_later: dict[str, int | None] = dict.fromkeys(self._targets, None)

    @property
    def targets(self) -> list[str]:
        """The destinations the relay has a worker for."""
        return list(self._targets)

    def kick(self) -> None:
        """Rows were committed: wake every worker (one that is pausing keeps its pause)."""
        for event in self._kicks.values():
            event.set()

    async def run_forever(self) -> None:
        """Run every destination's worker until cancelled."""
        await asyncio.gather(*(self._work(target) for target in self._targets))

    async def deliver_due(self, target: str) -> float:
        """Send ``target``'s due rows; returns the seconds until its next row is due (at most
        ``interval_s``)."""
        self._purge_if_due()
        paused = self._paused_until[target] - self._clock()
        if paused > 0:
            return min(paused, self._policy.interval_s)
        if not self._holds(target):
            self._none_later[target] = None  # the peer may put rows off meanwhile
            # A peer sends this destination's rows: no query until the lease answer expires.
            recheck = self._lease_answer[target][1] - self._clock()
            return max(0.0, min(recheck, self._policy.interval_s))
        self._found[target] = False
        while (held := self._holds(target)) and (
            rows := self._outbox.due(target, limit=self._policy.batch)
        ):
            self._found[target] = True
            try:
                for group in self._calls(rows):
                    if not await self._deliver_group(group):
                        return min(
                            self._paused_until[target] - self._clock(), self._policy.interval_s
                        )
            finally:
                sent, self._sent[target] = self._sent[target], []
                self._outbox.delivered_many(sent)
            if len(rows) < self._policy.batch:
                break  # that was every due row: no second look
        scheduled = self._outbox.retries_scheduled
        if not held:
            self._none_later[target] = None  # lost midway: a peer sends its rows now
        elif self._none_later[target] == scheduled:
            # Nothing was pending after the last look and no row was put off since: the
            # rows written meanwhile were due at once, and this pass sent them all.
            return self._policy.interval_s
        upcoming = self._outbox.next_attempt_time(target)
        if upcoming is None:
            self._none_later[target] = scheduled
            return self._policy.interval_s
        return max(0.0, min(upcoming - self._clock(), self._policy.interval_s))

    def _holds(self, target: str) -> bool:
        """Whether this replica sends ``target``'s rows now (claiming or renewing its lease).

        The answer stands for a third of the lease period: every commit wakes every worker,
        and a claim is a write, so a holder renews (and a peer looks again) at most three
        times a period instead of at every look; a held lease still has two thirds left.
        """
        if self._leases is None:
            return True
        now = self._clock()
        held, until = self._lease_answer.get(target, (False, -math.inf))
        if now < until:
            return held
        held = self._leases.claim(f"outbox/{target}")
        self._lease_answer[target] = (held, now + self._leases.renew_every_s)
        return held

    async def _work(self, target: str) -> None:
        kicked = self._kicks[target]
        loop = asyncio.get_running_loop()
        gather_s = self._policy.gather_s
        while True:
            kicked.clear()
            started = loop.time()
            try:
                wait_s = await self.deliver_due(target)
            except Exception:  # a broken pass must not end delivery; the next one retries
                log.exception("outbox: delivery to %s failed", target)
                wait_s = self._policy.interval_s
            if not kicked.is_set():
                # A kick or the timer, whichever comes first (no wait_for task per wait).
                timer = loop.call_later(wait_s, kicked.set)
                try:
                    await kicked.wait()
                finally:
                    timer.cancel()
            # Woken by a commit soon after a pass that sent rows began: let the commits of
            # that window gather, so their rows share one batch call (and one look at the
            # table). A destination that had nothing to send gets the next row at once.
            rest = started + gather_s - loop.time()
            if rest > 0 and self._found[target]:
                await asyncio.sleep(rest)

    def _calls(self, rows: list[OutboxRow]) -> list[list[OutboxRow]]:
        """The rows grouped into calls: per method (in the order of its first row), runs of
        at most ``batch_items`` rows and ``batch_bytes`` bytes where the method has a batch
        route, else one row per call."""
        by_method: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_method.setdefault(row.method, []).append(row)
        calls: list[list[OutboxRow]] = []
        for method, found in by_method.items():
            route = self._routes.get(method)
            if route is None or route.batch is None or self._policy.batch_items == 1:
                calls.extend([row] for row in found)
                continue
            size = 0
            for row in found:
                if (
                    calls
                    and calls[-1][0].method == method
                    and (
                        len(calls[-1]) < self._policy.batch_items
                        and size + len(row.request) <= self._policy.batch_bytes
                    )
                ):
                    calls[-1].append(row)
                    size += len(row.request)
                else:
                    calls.append([row])
                    size = len(row.request)
        return calls

    async def _deliver_group(self, rows: list[OutboxRow]) -> bool:
        """One call for ``rows``; False when their destination failed and is now paused."""
        if len(rows) == 1:
            return await self._deliver(rows[0])
        route = self._routes[rows[0].method]
        assert route.batch is not None  # only a batch route groups rows
        sendable = [(row, request) for row in rows if (request := self._request(row, route))]
        if not sendable:
            return True
        token = otel_context.attach(propagate.extract(json.loads(rows[0].trace_context or "{}")))
        try:
            reply = await route.batch.send(route.batch.request([r for _, r in sendable]))
            results = list(reply.results)
            if len(results) != len(sendable):
                raise ValueError(f"{len(results)} results for {len(sendable)} items")
        except CallError as error:
            if error.code().name in REFUSED_CODES | BATCH_NOT_TAKEN:
                # The destination does not take this batch (an older deploy, a topology
                # without the grant) or refused the call as a whole: row by row, as before.
                log.warning("outbox: %s refused a batch (%s); sending singly", route.target, error)
                return await self._deliver_each([row for row, _ in sendable])
            return self._settle(route.target, [(row, error) for row, _ in sendable])
        except Exception as exc:  # a bug in a send must not lose the rows: retry them later
            log.exception("outbox: sending a batch to %s raised", route.target)
            bug = _bug(exc, route.target, rows[0].method)
            return self._settle(route.target, [(row, bug) for row, _ in sendable])
        finally:
            otel_context.detach(token)
        failed: list[tuple[OutboxRow, CallError]] = []
        for (row, _), result in zip(sendable, results, strict=True):
            if result.outcome == common_pb2.BATCH_ITEM_OUTCOME_FAILED:
                failed.append((row, item_error(result.error, target=row.target, method=row.method)))
            else:
                self._sent.setdefault(row.target, []).append(row.seq)
        return self._settle(route.target, failed)

    async def _deliver_each(self, rows: list[OutboxRow]) -> bool:
        for row in rows:
            if not await self._deliver(row):
                return False
        return True

    def _request(self, row: OutboxRow, route: Route) -> Message | None:
        """The row's request; None (the row refused for good) if it cannot be decoded."""
        try:
            return route.request_type.FromString(row.request)
        except DecodeError as exc:
            log.error("outbox: event %s is not a %s: %s", row.event_id, route.request_type, exc)
            self._outbox.refused(row.seq, f"undecodable request: {exc}")
            return None

    async def _deliver(self, row: OutboxRow) -> bool:
        """One attempt at ``row``; False when its destination failed and is now paused."""
        route = self._routes.get(row.method)
        if route is None:
            log.error("outbox: no route for %s (event %s); not sent", row.method, row.event_id)
            self._outbox.refused(row.seq, f"no route for {row.method}")
            return True
        request = self._request(row, route)
        if request is None:
            return True
        token = otel_context.attach(propagate.extract(json.loads(row.trace_context or "{}")))
        try:
            await route.send(request)
        except CallError as error:
            return self._settle(row.target, [(row, error)])
        except Exception as exc:  # a bug in a send must not lose the row: retry it later
            log.exception("outbox: sending event %s raised", row.event_id)
            return self._settle(row.target, [(row, _bug(exc, row.target, row.method))])
        finally:
            otel_context.detach(token)
        self._sent.setdefault(row.target, []).append(row.seq)
        self._recovered(row.target)
        return True

    def _settle(self, target: str, failures: list[tuple[OutboxRow, CallError]]) -> bool:
        """Mark rows the destination answered with an error; False when one is to be retried
        (the destination is then paused, one failure counted whatever their number)."""
        retry: list[tuple[OutboxRow, str]] = []
        for row, failure in failures:
            code = failure.code()
            error = f"{code.name}: {failure.details() or ''}"
            if isinstance(failure, AlreadyExistsError) or (
                isinstance(failure, NotFoundError) and row.missing_ok
            ):
                # The request id is known (its record outlived its retention) or there is
                # nothing left to change: the message has had its effect.
                self._sent.setdefault(row.target, []).append(row.seq)
            elif code.name in REFUSED_CODES:
                log.warning("outbox: %s refused event %s for good: %s", target, row.event_id, error)
                self._outbox.refused(row.seq, error)
            else:
                retry.append((row, error))
        if not retry:
            self._recovered(target)
            return True
        failures_now = self._failures[target] = self._failures[target] + 1
        pause = backoff_delay_s(self._schedule, failures_now, self._rng)
        at = self._clock() + pause
        self._paused_until[target] = at
        for row, error in retry:
            self._outbox.retry_later(row.seq, at=at, error=error)
        if failures_now == 1:
            log.warning(
                "outbox: %s not reachable (%s); its events wait, next attempt in %.1f s",
                target,
                retry[0][1],
                pause,
            )
        else:
            log.debug("outbox: %s still failing (%d): %s", target, failures_now, retry[0][1])
        return False

    def _recovered(self, target: str) -> None:
        if self._failures[target]:
            log.info(
                "outbox: %s reachable again after %d failed attempts",
                target,
                self._failures[target],
            )
            self._failures[target] = 0

    def _purge_if_due(self) -> None:
        now = self._clock()
        if 0 <= now - self._purged_at < self._policy.purge_interval_s:
            return
        self._purged_at = now
        purged = self._outbox.purge(before=now - self._policy.retention_s)
        if purged:
            log.info("outbox: purged %d delivered rows older than the retention", purged)


def _bug(exc: Exception, target: str, method: str) -> CallError:
    """A send that raised something other than a call error: UNKNOWN, retried later."""
    return UnknownError(
        grpc.StatusCode.UNKNOWN,
        repr(exc),
        target=target,
        method=method,
        attempts=1,
        stop_reason="not_retryable",
    )
