"""A transactional outbox: messages committed with the state change that causes them, then relayed.

A store writes each message as a row of ``outbox`` inside the very transaction that commits
the change (so a crash can never keep the change and lose the message, or the reverse), with
a stable event id that is the request id at the destination. :class:`OutboxRelay` sends the
rows: one worker per destination, woken by :meth:`OutboxRelay.kick` after a commit and by its
own timer, retrying failures with exponential backoff and jitter until the destination takes
the message (at-least-once; the destination dedupes by the request id). With replicas of the
gateway on one database, a destination's rows are sent by the replica holding its lease
(``outbox/<destination>``, :mod:`services.storage.leases`), renewed at every look.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    retention_s: float = 7 * 24 * 3600.0
    """How long delivered and refused rows are kept (for audit) before they are purged."""
    purge_interval_s: float = 600.0
    """Least time between two purges."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "initial_backoff_s", "max_backoff_s", "retention_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be at least initial_backoff_s")
        if self.batch < 1:
            raise ValueError(f"batch must be positive, got {self.batch}")
        if not math.isfinite(self.purge_interval_s) or self.purge_interval_s < 0:
            raise ValueError(f"purge_interval_s must be >= 0, got {self.purge_interval_s!r}")


@dataclass(frozen=True, slots=True)
class Route:
    """How the relay sends the rows of one method."""

    target: str
    """Mesh name of the destination (one worker per destination)."""
    request_type: type[Message]
    """The request message the rows hold."""
    send: Callable[[Any], Awaitable[object]]
    """The stub method (through the client chain, with its timeout and retries)."""


class OutboxRelay:
    """Sends outbox rows to their destinations, forever, at least once.

    Each destination has its own worker, so one that hangs delays nobody else's messages.
    A worker sends its due rows in the order written and marks a batch's delivered rows in
    one write (a crash before it only sends them again: delivery is at least once, and each
    destination dedupes by the event id); after a failure it pauses the whole
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
            # A peer sends this destination's rows: no query until the lease answer expires.
            recheck = self._lease_answer[target][1] - self._clock()
            return max(0.0, min(recheck, self._policy.interval_s))
        while self._holds(target) and (rows := self._outbox.due(target, limit=self._policy.batch)):
            try:
                for row in rows:
                    if not await self._deliver(row):
                        return min(
                            self._paused_until[target] - self._clock(), self._policy.interval_s
                        )
            finally:
                sent, self._sent[target] = self._sent[target], []
                self._outbox.delivered_many(sent)
            if len(rows) < self._policy.batch:
                break  # that was every due row: no second look
        upcoming = self._outbox.next_attempt_time(target)
        if upcoming is None:
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
        while True:
            kicked.clear()
            try:
                wait_s = await self.deliver_due(target)
            except Exception:  # a broken pass must not end delivery; the next one retries
                log.exception("outbox: delivery to %s failed", target)
                wait_s = self._policy.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kicked.wait(), timeout=wait_s)

    async def _deliver(self, row: OutboxRow) -> bool:
        """One attempt at ``row``; False when its destination failed and is now paused."""
        route = self._routes.get(row.method)
        if route is None:
            log.error("outbox: no route for %s (event %s); not sent", row.method, row.event_id)
            self._outbox.refused(row.seq, f"no route for {row.method}")
            return True
        try:
            request = route.request_type.FromString(row.request)
        except DecodeError as exc:
            log.error("outbox: event %s is not a %s: %s", row.event_id, route.request_type, exc)
            self._outbox.refused(row.seq, f"undecodable request: {exc}")
            return True
        token = otel_context.attach(propagate.extract(json.loads(row.trace_context or "{}")))
        try:
            await route.send(request)
        except CallError as error:
            return self._failed(row, error)
        except Exception as exc:  # a bug in a send must not lose the row: retry it later
            log.exception("outbox: sending event %s raised", row.event_id)
            bug = UnknownError(
                grpc.StatusCode.UNKNOWN,
                repr(exc),
                target=row.target,
                method=row.method,
                attempts=1,
                stop_reason="not_retryable",
            )
            return self._failed(row, bug)
        finally:
            otel_context.detach(token)
        self._sent.setdefault(row.target, []).append(row.seq)
        self._recovered(row.target)
        return True

    def _failed(self, row: OutboxRow, failure: CallError) -> bool:
        code = failure.code()
        error = f"{code.name}: {failure.details() or ''}"
        if isinstance(failure, AlreadyExistsError) or (
            isinstance(failure, NotFoundError) and row.missing_ok
        ):
            # The request id is known (its record outlived its retention) or there is
            # nothing left to change: the message has had its effect.
            self._sent.setdefault(row.target, []).append(row.seq)
            self._recovered(row.target)
            return True
        if code.name in REFUSED_CODES:
            log.warning("outbox: %s refused event %s for good: %s", row.target, row.event_id, error)
            self._outbox.refused(row.seq, error)
            self._recovered(row.target)
            return True
        failures = self._failures[row.target] = self._failures[row.target] + 1
        pause = backoff_delay_s(self._schedule, failures, self._rng)
        at = self._clock() + pause
        self._paused_until[row.target] = at
        self._outbox.retry_later(row.seq, at=at, error=error)
        if failures == 1:
            log.warning(
                "outbox: %s not reachable (%s); its events wait, next attempt in %.1f s",
                row.target,
                error,
                pause,
            )
        else:
            log.debug("outbox: %s still failing (%d): %s", row.target, failures, error)
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
