"""Outage of one hop, four clients on the same workload: the old BreakerClient, gRPC's own
service-config retries with the seed's numbers and as a careful user configures them
(caller's deadline, reads only, UNAVAILABLE only, retry throttling), and PayMesh's chain.

Two outages: ``down`` (the target is SIGKILLed after warm-up: connection refused) and ``hang``
(the target accepts every call, performs its side effect, and never answers). The workload is
open-loop, like merchants: calls arrive at a fixed rate whatever the answers, alternating a read
(``Read``, NO_SIDE_EFFECTS) and a write without idempotency key (``WriteUnsafe``), each with a
unique text the target counts, so a write executed twice is a duplicate side effect. Every
duration of every client is multiplied by ``--time-scale`` (printed), so the run stays short
while the ratios between the clients keep. Then the cost on a healthy target: the careful
native retry and the chain against a bare stub, alternating rounds in one client process
(latency and client CPU ratios). Server, orchestrator and each client are separate processes.
Prints both tables, then one JSON line. ``python -m bench.outage [--time-scale 0.1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.old_breaker_client import OldBreakerClient, OldBreakerConfig  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402

#: ``grpc_native_retry`` is gRPC configured with the seed's numbers (what a port of the old
#: client would write); ``grpc_native_sensible`` is gRPC configured as a careful user would:
#: the caller's deadline, reads only, UNAVAILABLE only, the chain's backoff, retry throttling.
CLIENTS = ("old_breaker_client", "grpc_native_retry", "grpc_native_sensible", "paymesh_chain")
NATIVE_CLIENTS = ("grpc_native_retry", "grpc_native_sensible")
#: The healthy-target cost table: the chain and careful native retries against a bare stub.
COST_CLIENTS = ("bare", "grpc_native_sensible", "paymesh_chain")
MODES = ("down", "hang")
STATS_TEXT = "__stats__"
#: The mesh's deadline (services/mesh/policy.toml timeout_s) and the seed's numbers, unscaled.
CALLER_DEADLINE_S = 5.0
SCHEDULING_MARGIN_S = 0.02
#: gRPC's attempt counter: one trace line per attempt the retry filter creates.
ATTEMPT_TRACE_MARK = "created attempt"
#: retryThrottling of the careful native client: like the chain's budget (retries at most
#: about a fifth of the calls once failures have drained the bucket).
RETRY_MAX_TOKENS = 10
RETRY_TOKEN_RATIO = 0.2


# --- the target ---------------------------------------------------------------------------


class _Target(testing_pb2_grpc.TestServiceServicer):
    def __init__(self) -> None:
        self.hanging = False
        self.executions: collections.Counter[str] = collections.Counter()

    async def _hang_if_asked(self) -> None:
        if self.hanging:
            await asyncio.sleep(3600)  # cancelled when the caller gives up

    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        if request.text == STATS_TEXT:
            return testing_pb2.ReadResponse(text=json.dumps(self.executions))
        await self._hang_if_asked()
        return testing_pb2.ReadResponse(text=request.text)

    async def WriteUnsafe(self, request: Any, context: Any) -> testing_pb2.WriteUnsafeResponse:
        self.executions[request.text] += 1  # the side effect happens before the hang
        await self._hang_if_asked()
        return testing_pb2.WriteUnsafeResponse(text=request.text)


async def _serve() -> None:
    target = _Target()  # type: ignore[abstract]  # serves only what the benchmark calls; the rest answer UNIMPLEMENTED
    server = aio.server()
    testing_pb2_grpc.add_TestServiceServicer_to_server(target, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    def hang() -> None:
        target.hanging = True

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, hang)
    print(port, flush=True)
    await server.wait_for_termination()


# --- the three clients --------------------------------------------------------------------


def _native_service_config(scale: float) -> str:
    """gRPC retryPolicy with the seed's numbers: 4 attempts, 1-2-4 s backoff, 30 s per attempt."""
    policy = {
        "maxAttempts": 4,
        "initialBackoff": f"{1.0 * scale:.3f}s",
        "maxBackoff": f"{4.0 * scale:.3f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"],
        # Needs grpc.experimental.enable_hedging; a timed-out attempt is retried.
        "perAttemptRecvTimeout": f"{30.0 * scale:.3f}s",
    }
    return json.dumps(
        {
            "methodConfig": [
                {"name": [{"service": "paymesh.testing.v1.TestService"}], "retryPolicy": policy}
            ]
        }
    )


def _sensible_service_config(scale: float) -> str:
    """gRPC retryPolicy as a careful user writes it: only the idempotent Read is retried, only
    on UNAVAILABLE, with the chain's backoff and retry throttling; every call carries the
    caller's deadline."""
    policy = {
        "maxAttempts": 4,
        "initialBackoff": f"{0.05 * scale:.3f}s",
        "maxBackoff": f"{1.0 * scale:.3f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    read = {"service": "paymesh.testing.v1.TestService", "method": "Read"}
    return json.dumps(
        {
            "methodConfig": [{"name": [read], "retryPolicy": policy}],
            # A token bucket per channel, as gRFC A6 advises: each failure takes a token,
            # each success gives back RETRY_TOKEN_RATIO; retries stop below half the bucket,
            # so an outage costs at most a few retries instead of maxAttempts per call.
            "retryThrottling": {"maxTokens": RETRY_MAX_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO},
        }
    )


def _chain_policy(scale: float) -> dict[str, Any]:
    """services/mesh/policy.toml's defaults with every duration multiplied by ``scale``."""
    return {
        "timeout_s": CALLER_DEADLINE_S * scale,
        "deadline_margin_s": 0.05 * scale,
        "retry": {"max_attempts": 4, "initial_backoff_s": 0.05 * scale, "max_backoff_s": scale},
        "budget": {"retry_ratio": 0.2, "min_retries": 10, "window_s": 10.0 * scale},
        "breaker": {
            "minimum_calls": 5,
            "failure_rate": 0.6,
            "window_s": 60.0 * scale,
            "open_s": 30.0 * scale,
            "half_open_calls": 3,
        },
    }


class _CountAttempts(aio.UnaryUnaryClientInterceptor):
    """Innermost: counts the attempts the chain hands to the transport."""

    def __init__(self) -> None:
        self.count = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.count += 1
        return await continuation(details, request)


class _Client:
    """One client of the bench: ``call(method, text)`` and how many attempts it sent."""

    def __init__(self, name: str, address: str, scale: float) -> None:
        self.name = name
        self.old: OldBreakerClient | None = None
        self.counter: _CountAttempts | None = None
        if name == "bare":
            # A plain channel and the caller's deadline: what the others' cost is measured
            # against (gRPC's defaults, no service config, so nothing is retried).
            self.channel = aio.insecure_channel(address)
            self.native_timeout_s = CALLER_DEADLINE_S * scale
        elif name == "old_breaker_client":
            self.old = OldBreakerClient(OldBreakerConfig.scaled(scale))
            self.channel = aio.insecure_channel(address, options=[("grpc.enable_retries", 0)])
        elif name == "grpc_native_retry":
            self.channel = aio.insecure_channel(
                address,
                options=[
                    ("grpc.service_config", _native_service_config(scale)),
                    ("grpc.enable_retries", 1),
                    ("grpc.experimental.enable_hedging", 1),
                ],
            )
            # No per-call deadline in the old numbers; the whole call gets what the old
            # client's worst case takes: 4 attempts of 30 s plus 1 + 2 + 4 s of backoff.
            self.native_timeout_s = (4 * 30.0 + 7.0) * scale
        elif name == "grpc_native_sensible":
            self.channel = aio.insecure_channel(
                address,
                options=[
                    ("grpc.service_config", _sensible_service_config(scale)),
                    ("grpc.enable_retries", 1),
                ],
            )
            self.native_timeout_s = CALLER_DEADLINE_S * scale
        else:
            from interceptors.aio import wait_connected
            from interceptors.chain import build_client_chain
            from interceptors.policy import PolicyConfig

            chain = build_client_chain(
                caller="bench",
                config=PolicyConfig.from_mapping({"defaults": _chain_policy(scale)}),
            )
            self.counter = _CountAttempts()
            self.channel = aio.insecure_channel(
                address,
                options=chain.channel_options(),
                interceptors=[*chain.aio_interceptors("bench-target"), self.counter],
            )
            # As ClientChain.aio_channel does: a retry after UNAVAILABLE waits briefly to connect.
            chain.runtime.connection_waiters["bench-target"] = lambda t: wait_connected(
                self.channel, t
            )
        self.stub = testing_pb2_grpc.TestServiceStub(self.channel)

    async def call(self, method: str, text: str) -> None:
        if method == "Read":
            request: Any = testing_pb2.ReadRequest(text=text)
            invoke: Any = self.stub.Read
        else:
            request = testing_pb2.WriteUnsafeRequest(text=text)
            invoke = self.stub.WriteUnsafe
        if self.old is not None:

            async def attempt(timeout_s: float) -> Any:
                return await invoke(request, timeout=timeout_s)

            await self.old.call(attempt)
        elif self.counter is None:
            await invoke(request, timeout=self.native_timeout_s)
        else:
            await invoke(request)  # the chain's own deadline

    def attempts_sent(self) -> int | None:
        if self.old is not None:
            return self.old.attempts_sent
        if self.counter is not None:
            return self.counter.count
        return None  # read from gRPC's retry trace by the orchestrator


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _run_client(name: str, address: str, scale: float, rate: float, duration: float) -> None:
    client = _Client(name, address, scale)
    for i in range(20):  # warm-up: connected, breaker closed, nothing failing
        await client.call("Read" if i % 2 == 0 else "WriteUnsafe", f"warm{i}")
    warm_attempts = client.attempts_sent() or 0
    print("ready", flush=True)
    sys.stdin.readline()  # the orchestrator has injected the fault

    results: list[tuple[float, str]] = []

    async def one(i: int) -> None:
        method = "Read" if i % 2 == 0 else "WriteUnsafe"
        started = time.perf_counter()
        code = "OK"
        try:
            await client.call(method, f"{method[0].lower()}{i}")
        except aio.AioRpcError as err:
            code = err.code().name
        except Exception as err:  # the old breaker's own errors
            code = type(err).__name__
        results.append((time.perf_counter() - started, code))

    calls = int(rate * duration)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    for i in range(calls):
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    await client.channel.close()

    latencies = sorted(r[0] for r in results)
    deadline = CALLER_DEADLINE_S * scale + SCHEDULING_MARGIN_S
    attempts = client.attempts_sent()
    summary = {
        "calls": calls,
        "ok": sum(1 for r in results if r[1] == "OK"),
        "codes": dict(collections.Counter(r[1] for r in results)),
        "p50_s": _percentile(latencies, 0.50),
        "p99_s": _percentile(latencies, 0.99),
        "max_s": latencies[-1] if latencies else 0.0,
        "past_deadline": sum(1 for x in latencies if x > deadline),
        "attempts_sent": None if attempts is None else attempts - warm_attempts,
        "wall_s": loop.time() - t0,
    }
    print(json.dumps(summary), flush=True)


async def _run_cost(address: str, calls: int, rounds: int) -> None:
    """Each of COST_CLIENTS on the healthy target: sequential Reads in alternating rounds
    (the order rotates each round), latency and this process's CPU per call; one JSON line."""
    clients = {name: _Client(name, address, 1.0) for name in COST_CLIENTS}
    for client in clients.values():
        for i in range(50):  # warm-up: connected, code paths hot
            await client.call("Read", f"warm{i}")
    latencies: dict[str, list[float]] = {name: [] for name in clients}
    cpu_s: dict[str, float] = dict.fromkeys(clients, 0.0)
    names = list(clients)
    per_round = max(1, calls // rounds)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            client, samples = clients[name], latencies[name]
            cpu_before = time.process_time()
            for i in range(per_round):
                started = time.perf_counter()
                await client.call("Read", f"c{i}")
                samples.append(time.perf_counter() - started)
            cpu_s[name] += time.process_time() - cpu_before
    for client in clients.values():
        await client.channel.close()
    result: dict[str, Any] = {}
    for name, samples in latencies.items():
        ordered = sorted(samples)
        result[name] = {
            "calls": len(ordered),
            "median_us": _percentile(ordered, 0.50) * 1e6,
            "p99_us": _percentile(ordered, 0.99) * 1e6,
            "client_cpu_us_per_call": cpu_s[name] / len(ordered) * 1e6,
        }
    bare = result["bare"]
    for figures in result.values():
        figures["ratio_median"] = figures["median_us"] / bare["median_us"]
        figures["ratio_p99"] = figures["p99_us"] / bare["p99_us"]
        figures["ratio_cpu"] = figures["client_cpu_us_per_call"] / bare["client_cpu_us_per_call"]
    print(json.dumps(result), flush=True)


# --- the orchestrator ---------------------------------------------------------------------


def _start_target() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.outage", "--serve"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


def _executions(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        reply = testing_pb2_grpc.TestServiceStub(channel).Read(
            testing_pb2.ReadRequest(text=STATS_TEXT), timeout=5
        )
    return dict(json.loads(reply.text))


def _trace_attempts(path: Path) -> int:
    with path.open(errors="replace") as lines:
        return sum(1 for line in lines if ATTEMPT_TRACE_MARK in line)


def run_cost(calls: int, rounds: int) -> dict[str, Any]:
    """The cost of each retry layer on a healthy target, from a client process of its own."""
    target, address = _start_target()
    try:
        runner = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.outage",
                "--cost-client",
                "--address",
                address,
                "--calls",
                str(calls),
                "--rounds",
                str(rounds),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=300,
        )
        if runner.returncode != 0:
            raise RuntimeError(f"the cost client failed: {runner.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(runner.stdout.strip().splitlines()[-1])
        return result
    finally:
        target.kill()
        target.wait()


def run_one(client: str, mode: str, scale: float, rate: float, duration: float) -> dict[str, Any]:
    """One client against one outage; its figures."""
    target, address = _start_target()
    env = dict(os.environ)
    if client in NATIVE_CLIENTS:
        env.update(GRPC_TRACE="retry", GRPC_VERBOSITY="debug")
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        trace = Path(log.name)
    try:
        with trace.open("w") as stderr:
            runner = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.outage",
                    "--client",
                    client,
                    "--address",
                    address,
                    "--time-scale",
                    str(scale),
                    "--rate",
                    str(rate),
                    "--duration",
                    str(duration),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
                env=env,
            )
            assert runner.stdin is not None and runner.stdout is not None
            line = runner.stdout.readline().strip()
            if line != "ready":
                runner.kill()
                raise RuntimeError(f"{client} did not warm up: {line!r}; see {trace}")
            time.sleep(0.2)  # let the trace of the warm-up reach the file
            warm_trace = _trace_attempts(trace)
            if mode == "down":
                target.kill()
                target.wait()
            else:
                target.send_signal(signal.SIGUSR1)
            runner.stdin.write("go\n")
            runner.stdin.flush()
            result: dict[str, Any] = json.loads(runner.stdout.readline())
            runner.wait(timeout=60)
        if result["attempts_sent"] is None:
            result["attempts_sent"] = _trace_attempts(trace) - warm_trace
        writes = [t for t in range(int(rate * duration)) if t % 2 == 1]
        if mode == "hang":
            executions = _executions(address)
            counts = [executions.get(f"w{i}", 0) for i in writes]
            result["writes_executed"] = sum(counts)
            result["duplicate_side_effects"] = sum(max(0, c - 1) for c in counts)
            result["writes_with_duplicates"] = sum(1 for c in counts if c > 1)
        else:
            # The target is dead: nothing executes, so nothing can execute twice.
            result["writes_executed"] = 0
            result["duplicate_side_effects"] = 0
            result["writes_with_duplicates"] = 0
        result["attempts_per_call"] = result["attempts_sent"] / result["calls"]
        return result
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
        trace.unlink(missing_ok=True)


def main(
    scale: float, rate: float, duration: float, cost_calls: int, cost_rounds: int
) -> dict[str, Any]:
    """Every client against every outage, then the retry layers' cost on a healthy target;
    prints both tables and the JSON line."""
    print(
        f"outage of one hop: time scale {scale:g} (every duration of every client x {scale:g}; "
        f"caller deadline {CALLER_DEADLINE_S * scale:g} s), {rate:g} calls/s for {duration:g} s, "
        f"half reads, half non-idempotent writes",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        results[mode] = {}
        for client in CLIENTS:
            results[mode][client] = run_one(client, mode, scale, rate, duration)
    print(
        "\nbehaviour on a down / hanging target (att/call: attempts sent per call; past dl: "
        "calls answered after the caller's deadline; dup fx: non-idempotent writes executed "
        "twice or more)"
    )
    header = (
        f"{'mode':5} {'client':20} {'ok':>5} {'p50 s':>7} {'p99 s':>7} {'att/call':>8} "
        f"{'past dl':>7} {'dup fx':>6}"
    )
    print(header)
    for mode, per_client in results.items():
        for client, r in per_client.items():
            print(
                f"{mode:5} {client:20} {r['ok']:>5} {r['p50_s']:7.3f} {r['p99_s']:7.3f} "
                f"{r['attempts_per_call']:8.2f} {r['past_deadline']:>7} "
                f"{r['duplicate_side_effects']:>6}"
            )
    print("(seconds are scaled; divide by the time scale for the unscaled equivalent)")
    cost = run_cost(cost_calls, cost_rounds)
    print(
        f"\ncost on a healthy target: {cost['bare']['calls']} sequential Reads per client in "
        f"{cost_rounds} alternating rounds, one client process; ratios against the bare stub"
    )
    print(
        f"{'client':22} {'median us':>9} {'p99 us':>8} {'median x':>8} {'p99 x':>6} "
        f"{'CPU us/call':>11} {'CPU x':>6}"
    )
    for client, c in cost.items():
        print(
            f"{client:22} {c['median_us']:9.1f} {c['p99_us']:8.1f} {c['ratio_median']:8.3f} "
            f"{c['ratio_p99']:6.2f} {c['client_cpu_us_per_call']:11.1f} {c['ratio_cpu']:6.2f}"
        )
    line = {
        "bench": "outage",
        "time_scale": scale,
        "rate_per_s": rate,
        "duration_s": duration,
        "caller_deadline_s": CALLER_DEADLINE_S * scale,
        "results": results,
        "retry_throttling": {"maxTokens": RETRY_MAX_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO},
        "healthy_cost": cost,
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    parser.add_argument(
        "--calls", type=int, default=3000, help="healthy-target calls per client (cost table)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (cost table)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cost-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve())
    elif options.cost_client:
        asyncio.run(_run_cost(options.address, options.calls, options.rounds))
    elif options.client:
        asyncio.run(
            _run_client(
                options.client, options.address, options.time_scale, options.rate, options.duration
            )
        )
    else:
        main(options.time_scale, options.rate, options.duration, options.calls, options.rounds)
