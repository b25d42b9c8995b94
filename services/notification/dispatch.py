"""Durable webhook delivery: one attempt recorded on its row, and the loop that retries.

Every notification is PENDING with a next attempt time until it is DELIVERED, SKIPPED (no
URL: none given and the merchant has none at merchant-service), FAILED (its URL may not be
reached) or DEAD_LETTERED (every attempt of a round failed, see ``schedule``). The loop looks
for due notifications every ``scan_interval_s`` and attempts them, a few at a time; the state
is in SQLite, so a restart resumes where it stopped, at least once per event: an attempt cut
off by a crash is made again, with the same Idempotency-Key. One attempt per notification
runs at a time in this process, in a task of its own, so a caller that stops waiting for it
(SendNotification waits ``inline_wait_s`` at most) does not cut it off.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from interceptors.errors import CallError, NotFoundError
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from paymesh.notification.v1 import notification_pb2 as pb
from services.notification import delivery
from services.notification.delivery import DestinationPolicy, RefusedDestination
from services.notification.schedule import DeliverySchedule, Random
from services.notification.store import Attempt, Delivery, NotificationStore
from services.notification.webhooks import Reply, WebhookSender

log = logging.getLogger("paymesh.notification.dispatch")

DEFAULT_SCAN_INTERVAL_S = 1.0
DEFAULT_CONCURRENCY = 8
DEFAULT_INLINE_WAIT_S = 1.0
#: Most due notifications one pass takes on.
PASS_BATCH = 100
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopSettings:
    """How the delivery loop paces itself."""

    scan_interval_s: float = DEFAULT_SCAN_INTERVAL_S
    """Pause between two looks for due notifications."""
    concurrency: int = DEFAULT_CONCURRENCY
    """Attempts the loop makes at once."""
    inline_wait_s: float = DEFAULT_INLINE_WAIT_S
    """Longest SendNotification waits for a new notification's first attempt before it
    answers PENDING (the attempt goes on), so a slow endpoint does not hold its callers."""

    def __post_init__(self) -> None:
        for name in ("scan_interval_s", "inline_wait_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency!r}")


class _NoUrl(Exception):
    """There is nothing to deliver to; the message says why."""


class _LookupFailed(Exception):
    """merchant-service could not say where to deliver; try again later."""


class Dispatcher:
    """Makes delivery attempts and runs the loop that retries the due ones.

    Args:
        store: the notifications.
        sender: posts one signed webhook.
        merchants: merchant-service, asked for the URL of a notification that came without one.
        policy: where webhooks may go.
        schedule: when a failed notification is attempted again, and when given up.
        settings: the loop's pace.
        clock: seconds since the epoch (tests pass their own).
        rng: the schedule's jitter.
        sleep: waits between passes.
    """

    def __init__(
        self,
        store: NotificationStore,
        sender: WebhookSender,
        merchants: merchant_pb2_grpc.MerchantServiceAsyncStub,
        *,
        policy: DestinationPolicy,
        schedule: DeliverySchedule,
        settings: LoopSettings = LoopSettings(),
        clock: Callable[[], float] = time.time,
        rng: Random = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._sender = sender
        self._merchants = merchants
        self._policy = policy
        self._schedule = schedule
        self._settings = settings
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        # Notifications being attempted in this process: nothing attempts one twice at once.
        self._delivering: set[str] = set()
        self._first_attempts: set[asyncio.Task[pb.Notification]] = set()
        self._loop: asyncio.Task[None] | None = None

    async def first_attempts(
        self, attempts: Sequence[tuple[str, bool]]
    ) -> list[pb.Notification | RefusedDestination]:
        """Attempt new notifications now, all at once, waiting at most ``inline_wait_s`` for
        their outcomes; ``attempts`` are ``(notification_id, raise_refusal)`` pairs.

        Returns, per notification in order, its state after the attempt, PENDING while the
        attempt goes on, or (with ``raise_refusal``) the RefusedDestination its URL turned
        out to be within the wait (it is recorded FAILED).
        """
        tasks = []
        for notification_id, raise_refusal in attempts:
            task = asyncio.create_task(self.attempt(notification_id, raise_refusal=raise_refusal))
            self._first_attempts.add(task)
            task.add_done_callback(self._forget_first_attempt)
            tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=self._settings.inline_wait_s)
        found: list[pb.Notification | RefusedDestination] = []
        for (notification_id, _), task in zip(attempts, tasks, strict=True):
            if not task.done():
                found.append(self._store.get(notification_id))
            elif isinstance(refused := task.exception(), RefusedDestination):
                found.append(refused)
            else:
                found.append(task.result())
        return found

    def _forget_first_attempt(self, task: asyncio.Task[pb.Notification]) -> None:
        self._first_attempts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, RefusedDestination):  # recorded FAILED, and told if waited
                log.error("first attempt failed", exc_info=exc)

    # -- one attempt -------------------------------------------------------------------
    async def attempt(
        self, notification_id: str, *, raise_refusal: bool = False
    ) -> pb.Notification:
        """Attempt the notification now if it is PENDING and not being attempted already.

        Returns its state afterwards (or as it is, if nothing was attempted).

        Raises:
            RefusedDestination: with ``raise_refusal``, the URL may not be reached (the
                notification is recorded FAILED first).
        """
        if notification_id in self._delivering:
            return self._store.get(notification_id)
        self._delivering.add(notification_id)
        try:
            current = self._store.delivery(notification_id)  # the latest, not a snapshot
            if current.notification.delivery_status != pb.DELIVERY_STATUS_PENDING:
                return current.notification
            try:
                outcome = await self._attempt(current)
            except RefusedDestination as exc:
                refused = Attempt(pb.DELIVERY_STATUS_FAILED, 0, _cut(f"refused: {exc}"))
                self._store.record_attempt(notification_id, refused)
                if raise_refusal:
                    raise
                return self._store.get(notification_id)
            return self._store.record_attempt(notification_id, outcome)
        finally:
            self._delivering.discard(notification_id)

    async def _attempt(self, current: Delivery) -> Attempt:
        notification = current.notification
        url = notification.webhook_url
        if current.url_from_merchant or not url:  # (a row of an older version has neither)
            try:
                url = await self._merchant_url(notification.merchant_id)
            except _NoUrl as exc:
                return Attempt(pb.DELIVERY_STATUS_SKIPPED, 0, str(exc), counted=False)
            except _LookupFailed as exc:
                return self._failed(current, Reply(0, str(exc)), url="")
        destination = delivery.parse(url, self._policy)
        reply = await self._sender.send(notification, destination)
        if not reply.error:
            return Attempt(pb.DELIVERY_STATUS_DELIVERED, reply.response_code, "", webhook_url=url)
        return self._failed(current, reply, url=url)

    def _failed(self, current: Delivery, reply: Reply, *, url: str) -> Attempt:
        """A failed attempt: PENDING until the next one, or DEAD_LETTERED once the round is over."""
        next_time = self._schedule.next_attempt_time(
            now=self._clock(),
            round_start=current.round_start_time,
            failures=current.round_failures + 1,
            rng=self._rng,
        )
        status = (
            pb.DELIVERY_STATUS_PENDING
            if next_time is not None
            else pb.DELIVERY_STATUS_DEAD_LETTERED
        )
        if next_time is None:
            log.warning(
                "notification %s dead-lettered after %d attempts: %s",
                current.notification.notification_id,
                current.notification.attempt_count + 1,
                reply.error,
            )
        return Attempt(
            status,
            reply.response_code,
            _cut(reply.error),
            webhook_url=url,
            next_attempt_time=next_time,
        )

    async def _merchant_url(self, merchant_id: str) -> str:
        """The merchant's webhook URL at merchant-service.

        Raises:
            _NoUrl: the merchant has none, or does not exist.
            _LookupFailed: merchant-service did not answer.
        """
        try:
            reply = await self._merchants.GetMerchant(
                merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)
            )
        except NotFoundError:
            raise _NoUrl(f"merchant {merchant_id!r} does not exist") from None
        except CallError as exc:
            raise _LookupFailed(
                f"merchant-service did not give the webhook URL of {merchant_id!r}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        if not reply.merchant.webhook_url:
            raise _NoUrl(f"merchant {merchant_id!r} has no webhook URL")
        return reply.merchant.webhook_url

    # -- the loop ----------------------------------------------------------------------
    async def run_once(self) -> int:
        """Attempt every due notification not being attempted already; returns how many."""
        due = [
            d.notification.notification_id
            for d in self._store.due(self._clock(), limit=PASS_BATCH)
            if d.notification.notification_id not in self._delivering
        ]
        if not due:
            return 0
        gate = asyncio.Semaphore(self._settings.concurrency)

        async def one(notification_id: str) -> None:
            async with gate:
                try:
                    await self.attempt(notification_id)
                except Exception:  # one broken notification must not stop the others
                    log.exception("delivery attempt of %s failed", notification_id)

        await asyncio.gather(*(one(notification_id) for notification_id in due))
        return len(due)

    async def run_forever(self) -> None:
        """A pass now, then one every ``scan_interval_s``, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:  # a failed pass (the store, say) must not end the loop
                log.exception("delivery pass failed")
            await self._sleep(self._settings.scan_interval_s)

    def start(self) -> None:
        """Run the loop in the background."""
        self._loop = asyncio.create_task(self.run_forever())

    async def close(self) -> None:
        """Stop the loop; attempts in flight are cut off and made again after a restart."""
        tasks: list[asyncio.Task[object]] = [*self._first_attempts]
        if self._loop is not None:
            tasks.append(self._loop)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _cut(error: str) -> str:
    return error[:MAX_ERROR_LENGTH]
