"""What every adapter of one process shares: policy, breakers, budgets, the observer, time.

Built once per process by ``build_client_chain``; the gRPC (aio and sync) and HTTP adapters
all read the same instance, so one target has one breaker and one budget whatever the
transport. Clock, sleeps, randomness and the tracer provider are injected here for exact
tests. No gRPC import (the OpenTelemetry API only).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from opentelemetry import trace

from interceptors.breaker import BreakerRegistry, TargetBreaker
from interceptors.budget import RetryBudget
from interceptors.deadline import OutgoingDeadline
from interceptors.observe import ChainObserver, Observer
from interceptors.policy import CallPolicy, PolicyConfig
from interceptors.telemetry import ChainTelemetry

Clock = Callable[[], float]
AsyncSleep = Callable[[float], Awaitable[None]]
SyncSleep = Callable[[float], None]
Random = Callable[[], float]


class Cancellable(Protocol):
    """What an attempt in flight is: a grpc.aio call or an asyncio task."""

    def cancel(self) -> bool:
        """Stop it; who awaits it sees CancelledError."""
        ...


class AbortableAttempt:
    """An attempt in flight that the breaker fails at once if it opens meanwhile.

    ``abort`` is the breaker's AbortHook: it may run on any thread (the breakers are shared
    with the sync adapter), so it only schedules the cancellation on the attempt's loop.
    """

    __slots__ = ("_attempt", "_loop", "aborted")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._attempt: Cancellable | None = None
        self.aborted = False
        """Whether the breaker failed it: a CancelledError then is ours, not the caller's."""

    def abort(self) -> None:
        """Cancel the attempt soon, on its own loop."""
        self.aborted = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._cancel)

    def attach(self, attempt: Cancellable) -> None:
        """The attempt, once made; cancelled at once if the breaker opened already."""
        self._attempt = attempt
        if self.aborted:
            attempt.cancel()

    def caused(self) -> bool:
        """Whether a CancelledError caught now came from ``abort``, not from the caller."""
        task = asyncio.current_task()
        return self.aborted and not (task is not None and task.cancelling())

    def _cancel(self) -> None:
        if self._attempt is not None:
            self._attempt.cancel()


#: Routes (target and method) kept resolved; partner routes are their policy keys, so this
#: only bounds a caller inventing method names: beyond it a route is resolved per call.
MAX_ROUTES_KEPT = 4096


class Route:
    """What every call of one target and method needs, resolved once: its policy, its
    target's breaker and budget, and the deadline it gets outside any incoming deadline."""

    __slots__ = ("breaker", "budget", "margin_s", "own_deadline", "policy", "timeout_s")

    def __init__(self, policy: CallPolicy, breaker: TargetBreaker, budget: RetryBudget) -> None:
        self.policy = policy
        self.breaker = breaker
        self.budget = budget
        self.timeout_s = policy.timeout_s
        self.margin_s = policy.deadline_margin_s
        #: The deadline of a call with no explicit timeout and no incoming deadline (the same
        #: every time).
        self.own_deadline = OutgoingDeadline(timeout_s=policy.timeout_s, propagated=False)


class ChainRuntime:
    """Policy lookups (cached), the breaker and budget of each target, and the observer."""

    def __init__(
        self,
        *,
        caller: str,
        config: PolicyConfig,
        clock: Clock = time.monotonic,
        sleep: AsyncSleep = asyncio.sleep,
        sync_sleep: SyncSleep = time.sleep,
        rng: Random = random.random,
        tracer_provider: trace.TracerProvider | None = None,
        trace_calls: bool = True,
    ) -> None:
        self.caller = caller
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.sync_sleep = sync_sleep
        self.rng = rng
        #: Spans of this process's calls; None means the global provider (a no-op by default).
        self.tracer_provider = tracer_provider
        self.tracer = trace.get_tracer("paymesh.chain", tracer_provider=tracer_provider)
        #: Whether calls get spans of their own. Off when nothing records them: the trace
        #: id of the incoming call still propagates, without paying for spans nobody sees.
        self.trace_calls = trace_calls
        self.telemetry = ChainTelemetry(caller=caller)
        #: Where every call, attempt and breaker event is reported (counters, spans, logs).
        self.observer: Observer = ChainObserver(
            telemetry=self.telemetry, tracer=self.tracer, trace_calls=trace_calls, clock=clock
        )
        self.breakers = BreakerRegistry(
            lambda target: config.target_policy(target).breaker,
            clock=clock,
            on_transition=lambda target, old, new: self.observer.breaker_transition(
                target, old, new
            ),
            on_trip=lambda target, rule: self.observer.breaker_tripped(target, rule),
        )
        self._lock = threading.Lock()
        self._budgets: dict[str, RetryBudget] = {}
        self._policies: dict[tuple[str, str], CallPolicy] = {}
        self._routes: dict[tuple[str, str], Route] = {}
        #: Per target, waits up to the given seconds for its channel to connect; True if it did.
        self.connection_waiters: dict[str, Callable[[float], Awaitable[bool]]] = {}

    def policy(self, target: str, method: str) -> CallPolicy:
        """The policy of one call (resolved once per target and method)."""
        key = (target, method)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = self.config.policy_for(target, method)
        return policy

    def route(self, target: str, method: str) -> Route:
        """The policy, breaker, budget and own deadline of one call (resolved once per target
        and method)."""
        key = (target, method)
        route = self._routes.get(key)
        if route is None:
            route = Route(
                self.policy(target, method), self.breakers.get(target), self.budget(target)
            )
            if len(self._routes) < MAX_ROUTES_KEPT:
                self._routes[key] = route
        return route

    def budget(self, target: str) -> RetryBudget:
        """The retry budget of ``target``, made on first use."""
        budget = self._budgets.get(target)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(target)
                if budget is None:
                    budget = RetryBudget(
                        target, self.config.target_policy(target).budget, clock=self.clock
                    )
                    self._budgets[target] = budget
        return budget

    def budgets(self) -> dict[str, dict[str, float]]:
        """Window figures of every budget made so far, by target."""
        return {target: b.snapshot() for target, b in sorted(self._budgets.items())}
