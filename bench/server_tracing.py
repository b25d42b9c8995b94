"""Benchmark of the server side of tracing when nothing records spans, one echo hop per call.

One server process per variant (bare grpc.aio; the policy interceptor alone; behind the
OpenTelemetry instrumentation with a sampled-out provider, as every service ran before; the
policy interceptor making the incoming trace context current, as services run now; and with
spans received, where an unsampled call now skips the span too), one client sending an
unsampled ``traceparent`` as mesh callers mostly do. Rounds interleave the variants; prints latency
and server CPU per call as ratios to the bare server, then one JSON line.
``python -m bench.server_tracing [--calls N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from grpc import aio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.access_log import _cpu_s  # noqa: E402
from bench.chain_overhead import _Servicer, _summary, latencies  # noqa: E402
from paymesh.testing.v1 import testing_pb2_grpc  # noqa: E402
from services.mesh.server import ServerPolicyInterceptor  # noqa: E402
from services.mesh.tracing import server_tracing, service_tracer_provider  # noqa: E402

VARIANTS = ("bare", "policy", "otel_unrecorded", "context_only", "exporter_set")
#: What a mesh caller sends: its attempt span's context, not sampled.
TRACEPARENT = (("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-00"),)


def _interceptors(variant: str) -> list[aio.ServerInterceptor]:
    if variant == "bare":
        return []
    if variant == "policy":
        return [ServerPolicyInterceptor(domain="bench-target")]
    # exporter_set: spans are received, but this caller did not sample its call.
    received = (SimpleSpanProcessor(InMemorySpanExporter()),) if variant == "exporter_set" else ()
    provider = service_tracer_provider("bench-target", {}, span_processors=received)
    # otel_unrecorded: the instrumentation's (sampled-out) span anyway, as services did before.
    recording = variant in ("otel_unrecorded", "exporter_set")
    tracing, trace_context = server_tracing(provider, recording=recording)
    return [*tracing, ServerPolicyInterceptor(domain="bench-target", trace_context=trace_context)]


async def _serve(variant: str) -> None:
    server = aio.server(interceptors=_interceptors(variant))
    testing_pb2_grpc.add_TestServiceServicer_to_server(
        _Servicer(failing=False),  # type: ignore[abstract]  # serves only Read; the rest answer UNIMPLEMENTED
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class _Traced:
    """A stub whose every call carries :data:`TRACEPARENT`."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def Read(self, request: Any, **options: Any) -> Any:
        return await self._stub.Read(request, metadata=TRACEPARENT, **options)


async def _run(
    servers: dict[str, subprocess.Popen[str]], calls: int, rounds: int
) -> dict[str, Any]:
    channels, stubs = {}, {}
    for variant, process in servers.items():
        assert process.stdout is not None
        channels[variant] = aio.insecure_channel(f"127.0.0.1:{process.stdout.readline()}")
        stubs[variant] = _Traced(testing_pb2_grpc.TestServiceStub(channels[variant]))
        await latencies(stubs[variant], 300)  # warm up
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_s: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(rounds):  # interleaved, in a fresh order, so drift hits all alike
        for variant in random.sample(VARIANTS, len(VARIANTS)):
            before = _cpu_s(servers[variant].pid)
            samples[variant] += await latencies(stubs[variant], calls // rounds)
            cpu_s[variant] += _cpu_s(servers[variant].pid) - before
    for channel in channels.values():
        await channel.close()
    return {
        # CPU is counted in clock ticks (10 ms): summed over the rounds, then per call.
        v: {**_summary(samples[v]), "server_cpu_us": cpu_s[v] / len(samples[v]) * 1e6}
        for v in VARIANTS
    }


def main(calls: int, rounds: int) -> None:
    servers = {
        v: subprocess.Popen(
            [sys.executable, __file__, "--serve", v], stdout=subprocess.PIPE, text=True
        )
        for v in VARIANTS
    }
    try:
        figures = asyncio.run(_run(servers, calls, rounds))
    finally:
        for process in servers.values():
            process.terminate()
            process.wait()
    bare = figures["bare"]
    print(f"{'server':16} {'median':>9} {'p99':>9} {'CPU/call':>9}  latency, CPU to bare")
    for variant, f in figures.items():
        latency = f["median_us"] / bare["median_us"]
        cpu = f["server_cpu_us"] / bare["server_cpu_us"]
        print(
            f"{variant:16} {f['median_us']:7.1f}us {f['p99_us']:7.1f}us "
            f"{f['server_cpu_us']:7.1f}us  {latency:.2f}x, {cpu:.2f}x"
        )
    before, after = figures["otel_unrecorded"], figures["context_only"]
    saved = {
        "median_us": before["median_us"] - after["median_us"],
        "server_cpu_us": before["server_cpu_us"] - after["server_cpu_us"],
    }
    print(
        f"no span when nothing records saves {saved['median_us']:.1f} us latency and "
        f"{saved['server_cpu_us']:.1f} us server CPU per call"
    )
    print(json.dumps({"bench": "server_tracing", **figures, "saved_by_context_only": saved}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=4000, help="calls per variant")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
    else:
        main(args.calls, args.rounds)
