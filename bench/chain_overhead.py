"""Benchmark of the client policy chain: bare stub vs the full chain, open-breaker rejection,
and attempts per call during a target outage with and without the retry budget.

Client and server run in separate processes. Prints figures and ratios (never pass/fail),
then one JSON line so runs can be compared. ``python -m bench.chain_overhead [--calls N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from interceptors.chain import build_client_chain  # noqa: E402
from interceptors.errors import CallError  # noqa: E402
from interceptors.policy import PolicyConfig  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.mesh.server import ServerPolicyInterceptor  # noqa: E402


class _Servicer(testing_pb2_grpc.TestServiceServicer):
    def __init__(self, failing: bool) -> None:
        self.failing = failing

    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "outage")
        return testing_pb2.ReadResponse(text=request.text)


async def _serve(failing: bool) -> None:
    server = aio.server(interceptors=[ServerPolicyInterceptor(domain="bench-target")])
    testing_pb2_grpc.add_TestServiceServicer_to_server(
        _Servicer(failing),  # type: ignore[abstract]  # serves only what the benchmark calls; the rest answer UNIMPLEMENTED
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _start_server(failing: bool) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, __file__, "--serve"] + (["--failing"] if failing else [])
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


def _chain(policy: dict[str, Any]) -> Any:
    return build_client_chain(
        caller="bench", config=PolicyConfig.from_mapping({"defaults": policy})
    )


async def latencies(stub: Any, calls: int) -> list[float]:
    out = []
    request = testing_pb2.ReadRequest(text="x")
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Read(request, timeout=5)
        out.append(time.perf_counter() - started)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
    }


async def _overhead(address: str, calls: int) -> dict[str, Any]:
    chain = _chain({})
    bare_channel = aio.insecure_channel(address)
    chain_channel = aio.insecure_channel(
        address,
        interceptors=chain.aio_interceptors("bench-target"),
        options=chain.channel_options(),
    )
    bare, chained = (
        testing_pb2_grpc.TestServiceStub(bare_channel),
        testing_pb2_grpc.TestServiceStub(chain_channel),
    )
    await latencies(bare, 200)
    await latencies(chained, 200)
    bare_samples: list[float] = []
    chain_samples: list[float] = []
    for _ in range(10):  # interleave so drift hits both alike
        bare_samples += await latencies(bare, calls // 10)
        chain_samples += await latencies(chained, calls // 10)
    await bare_channel.close()
    await chain_channel.close()
    b, c = _summary(bare_samples), _summary(chain_samples)
    return {"bare": b, "chain": c, "ratio_median": c["median_us"] / b["median_us"]}


async def _outage(address: str, calls: int) -> dict[str, Any]:
    no_breaker = {"breaker": {"minimum_calls": 1_000_000}}
    results: dict[str, Any] = {}
    for label, budget in (
        ("with_budget", {}),
        ("without_budget", {"budget": {"retry_ratio": 10.0, "min_retries": 1_000_000}}),
    ):
        chain = _chain({"retry": {"initial_backoff_s": 0.0}, **no_breaker, **budget})
        async with aio.insecure_channel(
            address, interceptors=chain.aio_interceptors("bench-target")
        ) as channel:
            stub = testing_pb2_grpc.TestServiceStub(channel)
            for _ in range(calls):
                with contextlib.suppress(CallError):
                    await stub.Read(testing_pb2.ReadRequest())
        results[label] = chain.telemetry.value("attempts_total") / calls
    chain = _chain({"retry": {"max_attempts": 1}})
    async with aio.insecure_channel(
        address, interceptors=chain.aio_interceptors("bench-target")
    ) as channel:
        stub = testing_pb2_grpc.TestServiceStub(channel)
        samples = []
        for i in range(2000):
            started = time.perf_counter()
            with contextlib.suppress(CallError):
                await stub.Read(testing_pb2.ReadRequest())
            if i >= 5:  # the breaker is open from the fifth failure on
                samples.append(time.perf_counter() - started)
    results["open_breaker"] = _summary(samples)
    return results


async def _main(calls: int) -> None:
    ok_server, ok_address = _start_server(failing=False)
    down_server, down_address = _start_server(failing=True)
    try:
        overhead = await _overhead(ok_address, calls)
        outage = await _outage(down_address, 200)
    finally:
        ok_server.terminate()
        down_server.terminate()
    for label in ("bare", "chain"):
        figures = overhead[label]
        print(f"{label:6} median {figures['median_us']:8.1f} us  p99 {figures['p99_us']:8.1f} us")
    print(f"ratio (median, goal <= 1.10): {overhead['ratio_median']:.2f}")
    print(
        f"open-breaker rejection median {outage['open_breaker']['median_us']:.1f} us (goal <= 50)"
    )
    print(
        f"attempts per call in an outage: {outage['with_budget']:.2f} with budget, "
        f"{outage['without_budget']:.2f} without"
    )
    print(json.dumps({"bench": "chain_overhead", "calls": calls, **overhead, **outage}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--failing", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        asyncio.run(_serve(options.failing))
    else:
        asyncio.run(_main(options.calls))
