"""The seed's hang scenario through the chain, on a real process that stops answering.

A target process serves; the chain's window fills with its successes; then the process is
SIGSTOPped while calls keep coming at 4/s with a 5 s deadline, the deployed breaker policy
deciding (issue 15: 33 of 40 calls waited out the deadline before). At most 5 may; the rest
fail fast. After SIGCONT, once the open time passed (on an injected clock), the breaker
reads half-open-ready, half-opens, and closes on the target's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2

from interceptors.breaker import HALF_OPEN_READY
from interceptors.errors import CallError, error_info
from interceptors.policy import BreakerPolicy, PolicyConfig
from paymesh.testing.v1 import testing_pb2 as pb
from tests.integration.gated import READY_PREFIX
from tests.integration.harness import TARGET, ShiftedClock, make_chain, stub_for

pytestmark = pytest.mark.slow

RATE_PER_S = 4.0
DEADLINE_S = 5.0
#: As many as the issue counted: ten seconds of calls, twice the deadline.
HANG_CALLS = 40
MAX_WAITED_OUT = 5
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Result:
    """How one call during the hang ended."""

    code: grpc.StatusCode
    reason: str
    attempts: int
    took_s: float


@contextlib.asynccontextmanager
async def target_process() -> AsyncIterator[tuple[int, str]]:
    """A TestService in a process of its own: its pid and address."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.gated",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert line.startswith(READY_PREFIX), f"target process said {line!r}"
        yield proc.pid, f"127.0.0.1:{int(line[len(READY_PREFIX) :])}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=10)


def _result(outcome: BaseException | None, took_s: float) -> Result:
    if outcome is None:
        return Result(grpc.StatusCode.OK, "", 1, took_s)
    assert isinstance(outcome, CallError), repr(outcome)
    details = dict(outcome.trailing_metadata()).get("grpc-status-details-bin")
    info = error_info(status_pb2.Status.FromString(details)) if details else None
    return Result(outcome.code(), info.reason if info else "", outcome.attempts, took_s)


async def test_a_hung_target_holds_at_most_five_calls_to_their_deadline_then_heals() -> None:
    clock = ShiftedClock()
    chain = make_chain({"timeout_s": DEADLINE_S}, clock=clock)  # the deployed breaker policy
    deployed = PolicyConfig.load(str(ROOT / "services" / "mesh" / "policy.toml")).defaults.breaker
    assert chain.runtime.config.defaults.breaker == deployed == BreakerPolicy()
    async with target_process() as (pid, address), stub_for(chain, address) as stub:
        for n in range(40):  # the window holds successes, as in the seed's run
            await stub.Write(pb.WriteRequest(request_id=f"warm-{n}", text="x"))

        os.kill(pid, signal.SIGSTOP)

        async def pay(n: int) -> Result:
            started = time.monotonic()
            try:
                await stub.Write(pb.WriteRequest(request_id=f"hang-{n}"), timeout=DEADLINE_S)
            except CallError as err:
                return _result(err, time.monotonic() - started)
            return _result(None, time.monotonic() - started)

        calls: list[asyncio.Task[Result]] = []
        begun = time.monotonic()
        for n in range(HANG_CALLS):  # paced like a client: 4 calls/s
            await asyncio.sleep(max(0.0, begun + n / RATE_PER_S - time.monotonic()))
            calls.append(asyncio.create_task(pay(n)))
        results = await asyncio.gather(*calls)

        waited_out = [r for r in results if r.code == grpc.StatusCode.DEADLINE_EXCEEDED]
        failed_in_flight = [r for r in results if r.reason == "CIRCUIT_OPEN" and r.attempts]
        refused = [r for r in results if r.reason == "CIRCUIT_OPEN" and not r.attempts]
        longest = max((r.took_s for r in failed_in_flight), default=0.0)
        print(
            f"\nhang scenario: {len(waited_out)} of {HANG_CALLS} calls waited out the"
            f" {DEADLINE_S:g} s deadline; {len(failed_in_flight)} failed in flight when the"
            f" breaker opened (after {longest:.2f} s at most); {len(refused)} refused at once"
        )
        assert len(waited_out) <= MAX_WAITED_OUT
        assert len(waited_out) + len(failed_in_flight) + len(refused) == HANG_CALLS
        assert {r.code for r in failed_in_flight + refused} <= {grpc.StatusCode.UNAVAILABLE}
        assert len(refused) >= HANG_CALLS // 2  # most never reached the hung target
        assert chain.breakers.states() == {TARGET: "open"}
        assert chain.telemetry.value("breaker_trips_total", rule="slow_call_rate") == 1

        os.kill(pid, signal.SIGCONT)
        clock.advance(deployed.open_s)  # the open time passes, on the breaker's clock
        assert chain.breakers.states() == {TARGET: HALF_OPEN_READY}
        assert chain.breakers.readouts()[TARGET].open_left_s == 0.0

        await stub.Write(pb.WriteRequest(request_id="trial-0", text="x"))
        assert chain.breakers.states() == {TARGET: "half-open"}
        for n in range(1, deployed.half_open_calls):
            await stub.Write(pb.WriteRequest(request_id=f"trial-{n}", text="x"))
        assert chain.breakers.states() == {TARGET: "closed"}
