"""Leases in the database: work that must have one owner is driven only by the replica holding it.

A lease is one row (``lease_key``, ``owner``, ``until_ns``) of the service's own database. A
replica claims it (a new row, or one that is its own or has expired), renews it while it works
and releases it when done; a replica that dies stops renewing, and once ``until_ns`` passes a
peer's claim succeeds and it takes the work over (at once when the holder was a process of
this host that is gone: a restarted replica resumes its predecessor's work). The owner is this
process's :func:`replica_id`. The lease period is ``PAYMESH_LEASE_S`` (:data:`DEFAULT_LEASE_S`).
The SQL is portable: an insert that keeps an existing row, then one guarded ``UPDATE``.

A claim or release runs in a transaction of its own, or in the caller's (``tx=``): work created
in a transaction is leased by that very commit (no peer can take it between its creation and
its claim), and work finished in one gives its lease up with the same commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from interceptors.errors import Reason
from services.mesh.errors import Aborted
from services.storage.sql import Database, Statements, register_base_tables, seconds_to_ns

log = logging.getLogger("paymesh.leases")

#: How long a lease lasts unrenewed (seconds): a dead replica's work waits this long.
LEASE_VAR = "PAYMESH_LEASE_S"
DEFAULT_LEASE_S = 15.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_ns INTEGER NOT NULL
);
"""
#: A base table: every database the store base opens (once this module is imported, as every
#: store that leases work imports it) migrates it in, as it does idempotency's.
register_base_tables("leases", SCHEMA)

#: Take the lease over when it is ours or has run out; the row count says who won.
_TAKE = (
    "UPDATE leases SET owner = ?, until_ns = ? WHERE lease_key = ? AND (owner = ? OR until_ns < ?)"
)
#: Take the lease from a holder known to be dead (compare-and-set on its owner).
_TAKE_FROM = "UPDATE leases SET owner = ?, until_ns = ? WHERE lease_key = ? AND owner = ?"
_RELEASE = "DELETE FROM leases WHERE lease_key = ? AND owner = ?"
_HOLDER = "SELECT owner, until_ns FROM leases WHERE lease_key = ?"


class LeaseHeld(Aborted):
    """Another replica holds the lease of this work; retry later (the same request id)."""

    def __init__(self, key: str, owner: str) -> None:
        super().__init__(
            f"{key} is being driven by another replica ({owner}); retry with the same request id",
            reason=Reason.ABORTED,
            metadata={"lease": key},
            retry_delay_s=1.0,
        )
        self.key = key
        self.owner = owner


def lease_s_from(environ: Mapping[str, str]) -> float:
    """``PAYMESH_LEASE_S``, else :data:`DEFAULT_LEASE_S`.

    Raises:
        ValueError: it is not a number of seconds from 1 to 3600 (the message names it).
    """
    raw = environ.get(LEASE_VAR, "")
    if not raw.strip():
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 1.0 <= value <= 3600.0:  # false for nan too
        raise ValueError(
            f"{LEASE_VAR}={raw!r} is not a number of seconds from 1 to 3600 "
            f"(default {DEFAULT_LEASE_S:g})"
        )
    return value


def default_lease_s() -> float:
    """The lease period of this process (from ``os.environ``)."""
    return lease_s_from(os.environ)


@functools.cache
def replica_id(service: str) -> str:
    """This process's owner id: service, host, pid and a random part (pids are reused)."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def died_on_this_host(owner: str) -> bool:
    """Whether ``owner`` (a :func:`replica_id`) was a process of this host that is gone.

    Its lease need not run out: a replica restarted after a crash (``make run``'s launcher,
    a container restarted in its pod) takes its predecessor's work over at once. Only a
    certainty counts: another host, an unreadable id or a live pid (perhaps reused) is
    treated as alive, and the lease waits for its period.
    """
    host, _, rest = owner.rpartition("@")[2].partition(":")
    pid_text, _, _ = rest.partition(":")
    if not host or host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        # This process has its pid: the owner was an earlier process with the same pid
        # (pid 1 of a restarted container), not this one, whose id differs in its random part.
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")  # killed, not yet reaped by its parent


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease and until when."""

    owner: str
    until_ns: int


class HeldLease:
    """A lease :meth:`Leases.held` holds for a block."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.release_at_end = True
        """Whether the block's end releases it (not when :meth:`released` was called)."""

    def released(self) -> None:
        """Say a transaction of the block released the lease already (with its last write);
        call it only after that transaction committed, with no await since."""
        self.release_at_end = False


def work_key(kind: str, key: str) -> str:
    """The lease key of the work ``key`` of a kind (``payments/pay_...``)."""
    return f"{kind}/{key}"


class Leases:
    """The lease table of one database, claimed for one owner (this replica).

    Args:
        db: the service's database (its schema includes :data:`SCHEMA`).
        owner: this replica's id (:func:`replica_id`).
        lease_s: how long a claim lasts unrenewed; renewed every third of it while held.
    """

    def __init__(self, db: Database, owner: str, *, lease_s: float | None = None) -> None:
        self._db = db
        self.owner = owner
        self.lease_s = default_lease_s() if lease_s is None else lease_s
        if not (math.isfinite(self.lease_s) and self.lease_s > 0):
            raise ValueError(f"lease_s must be a positive number, got {self.lease_s!r}")
        # The leases held by blocks of :meth:`held`, oldest renewal first (so in due order),
        # and the one timer that renews them.
        self._renewals: dict[_Renewal, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def renew_every_s(self) -> float:
        """Pause between two renewals of a held lease: three renewals fit in one period."""
        return self.lease_s / 3

    def claim(self, key: str, *, tx: Statements | None = None) -> bool:
        """Take or renew the lease ``key``; False when another replica holds it unexpired.

        Args:
            tx: an open transaction of this database to claim in (it commits with the
                caller's writes); by default the claim is a transaction of its own.
        """
        if tx is not None:
            return self._claim(tx, key)
        with self._db.transaction() as own:
            return self._claim(own, key)

    def _claim(self, tx: Statements, key: str) -> bool:
        now = self._db.clock_ns()
        until = now + seconds_to_ns(self.lease_s)
        row = {"lease_key": key, "owner": self.owner, "until_ns": until}
        if tx.insert("leases", row, unless_exists=True):
            return True
        if tx.run(_TAKE, (self.owner, until, key, self.owner, now)) == 1:
            return True
        holder = tx.one(_HOLDER, (key,))
        if holder is None or not died_on_this_host(str(holder["owner"])):
            return False
        log.info("lease %s: its holder %s is gone; taken over at once", key, holder["owner"])
        return tx.run(_TAKE_FROM, (self.owner, until, key, holder["owner"])) == 1

    def release(self, key: str, *, tx: Statements | None = None) -> None:
        """Give the lease up (if it is still ours), so a peer need not wait for it to expire.

        Args:
            tx: an open transaction of this database to release in (the work's last write,
                say); by default the release is a transaction of its own.
        """
        if tx is not None:
            tx.run(_RELEASE, (key, self.owner))
            return
        with self._db.transaction() as own:
            own.run(_RELEASE, (key, self.owner))

    def holder(self, key: str) -> Holder | None:
        """Who holds ``key`` now; None when nobody does (no row, or expired)."""
        row = self._db.one(_HOLDER, (key,))
        if row is None or row["until_ns"] < self._db.clock_ns():
            return None
        return Holder(owner=str(row["owner"]), until_ns=int(row["until_ns"]))

    def require(self, key: str, *, tx: Statements | None = None) -> None:
        """Claim ``key`` (in ``tx``, as :meth:`claim`) or raise :class:`LeaseHeld` naming its
        holder (a refusal raised inside ``tx`` rolls the caller's transaction back)."""
        if not self.claim(key, tx=tx):
            holder = self.holder(key)
            raise LeaseHeld(key, holder.owner if holder is not None else "unknown")

    @contextlib.asynccontextmanager
    async def held(
        self,
        key: str,
        *,
        on_lost: Callable[[], None] | None = None,
        claimed: bool = False,
    ) -> AsyncIterator[HeldLease]:
        """Hold ``key`` for the block, renewing it; released at the end.

        Args:
            on_lost: called when a renewal finds the lease taken (this replica stalled past
                its period and a peer took the work over): the block must stop; by default
                its task is cancelled.
            claimed: the caller holds the lease already (it claimed it just now, perhaps in
                the transaction that created the work): no claim of its own before the block.

        The block gets a :class:`HeldLease`; when a transaction of the block released the
        lease (``release(key, tx=...)`` with the work's last write), it says so with
        :meth:`HeldLease.released` and the end commits no release of its own.

        Every lease held is renewed by one timer of the event loop (not a task per lease):
        the leases are due in the order they were taken, so the timer waits for the first.

        Raises:
            LeaseHeld: another replica holds it (not with ``claimed``).
        """
        if not claimed:
            self.require(key)
        task = asyncio.current_task()

        def cancel_task() -> None:
            if task is not None:
                task.cancel()

        lease = HeldLease(key)
        renewal = _Renewal(key, on_lost or cancel_task)
        self._renew_later(renewal)
        try:
            yield lease
        finally:
            self._stop_renewing(renewal)
            if lease.release_at_end:
                with contextlib.suppress(Exception):  # an unreleased lease only expires
                    self.release(key)

    def _renew_later(self, renewal: _Renewal) -> None:
        """Put ``renewal`` last in line, due one renewal pause from now."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first lease held (on this loop)
            self._stop_timer()
            self._renewals.clear()
            self._loop = loop
        renewal.due = loop.time() + self.renew_every_s
        self._renewals[renewal] = None
        if self._timer is None:
            self._timer = loop.call_at(renewal.due, self._renew_due)

    def _stop_renewing(self, renewal: _Renewal) -> None:
        self._renewals.pop(renewal, None)
        if not self._renewals:
            self._stop_timer()
            self._loop = None

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _renew_due(self) -> None:
        """The timer: renew every lease that is due, then wait for the next one."""
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        due = []
        for renewal in self._renewals:  # in due order: one pause apart from their last renewal
            if renewal.due > now:
                break
            due.append(renewal)
        for renewal in due:
            if renewal not in self._renewals:  # a lost callback ended that block already
                continue
            del self._renewals[renewal]
            try:
                still = self.claim(renewal.key)
            except Exception:  # a locked or lost database: try again, the period allows two
                log.warning("could not renew lease %s", renewal.key, exc_info=True)
                still = True
            if still:
                renewal.due = now + self.renew_every_s
                self._renewals[renewal] = None
                continue
            log.warning(
                "lease %s was taken over by another replica; stopping its work", renewal.key
            )
            try:
                renewal.lost()
            except Exception:  # one block's failing callback must not stop the others' renewal
                log.exception("lease %s: its on_lost callback failed", renewal.key)
        if self._renewals and self._timer is None and self._loop is loop:
            first = next(iter(self._renewals))
            self._timer = loop.call_at(first.due, self._renew_due)


class _Renewal:
    """One held lease in the renewal line: its key, when it is due, what to do if lost."""

    __slots__ = ("due", "key", "lost")

    def __init__(self, key: str, lost: Callable[[], None]) -> None:
        self.key = key
        self.lost = lost
        self.due = 0.0
