"""Benchmark of the client policy chain as the services run it against a bare stub, the
open-breaker rejection, and attempts per call during a target outage with and without the budget.

The chain is built by ``services.mesh.bootstrap.connect`` (the client factory, Prometheus and
recent-call hooks, the service's tracer provider) for a plaintext service whose target is the
echo server; the bare stub's channel has the chain's own arguments
(``ClientFactory.channel_options``: reconnect backoff, gRPC's retries off, the balancing
service config). Echo server and span receiver run in their own processes; rounds alternate
the variants in a fresh order. Prints figures and ratios (never pass/fail), then one JSON line.
``python -m bench.chain_overhead [--calls N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from interceptors.chain import build_client_chain  # noqa: E402
from interceptors.errors import CallError  # noqa: E402
from interceptors.policy import PolicyConfig  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.mesh.bootstrap import connect, load_config  # noqa: E402
from services.mesh.server import ServerPolicyInterceptor  # noqa: E402
from services.mesh.topology import Target, Topology  # noqa: E402
from services.mesh.tracing import sampler  # noqa: E402

#: The service whose chain is measured, and the edge it calls (the echo server stands in).
CALLER, TARGET = Target.PAYMENT_GATEWAY, Target.ORDER
#: The variants: the bare stub, the chain with nothing receiving spans (the default), and the
#: chain exporting spans over OTLP at the default sampler (1 %, parent-based) and at ratio 1.
VARIANTS = ("bare", "chain", "exported_default", "exported_all")
#: The OTEL_* settings of each chain variant; ``{receiver}`` is the span receiver's address.
TRACING_ENV: dict[str, dict[str, str]] = {
    "chain": {},
    "exported_default": {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://{receiver}",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
    },
    "exported_all": {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://{receiver}",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        "OTEL_TRACES_SAMPLER_ARG": "1",
    },
}


class _Servicer(testing_pb2_grpc.TestServiceServicer):
    def __init__(self, failing: bool) -> None:
        self.failing = failing

    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "outage")
        return testing_pb2.ReadResponse(text=request.text)


class _DroppingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace endpoint that accepts every export and keeps nothing."""

    async def Export(self, request: Any, context: Any) -> Any:
        return trace_service_pb2.ExportTraceServiceResponse()


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


async def _receive() -> None:
    server = aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _DroppingReceiver(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _start(*mode: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, __file__, *mode], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


def _start_server(failing: bool) -> tuple[subprocess.Popen[str], str]:
    return _start("--serve", *(["--failing"] if failing else []))


def _chain(policy: dict[str, Any]) -> Any:
    return build_client_chain(
        caller="bench", config=PolicyConfig.from_mapping({"defaults": policy})
    )


async def latencies(stub: Any, calls: int, **options: Any) -> list[float]:
    out = []
    request = testing_pb2.ReadRequest(text="x")
    for _ in range(calls):
        started = time.perf_counter()
        await stub.Read(request, **options)
        out.append(time.perf_counter() - started)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
    }


def _handler_contexts(variant: str, count: int) -> list[otel_context.Context]:
    """The trace contexts calls are made in, as a service's handlers have them: the incoming
    call's, sampled as the service's own sampler decides a new trace (never, with no exporter)."""
    decide = sampler(_environ(variant, "")) if variant.startswith("exported") else None
    contexts = []
    for _ in range(count):
        trace_id = random.getrandbits(128) or 1
        sampled = (
            decide is not None
            and decide.should_sample(None, trace_id, "handler").decision
            == Decision.RECORD_AND_SAMPLE
        )
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        span = NonRecordingSpan(SpanContext(trace_id, random.getrandbits(64) or 1, True, flags))
        contexts.append(trace.set_span_in_context(span))
    return contexts


def _environ(variant: str, receiver: str) -> dict[str, str]:
    settings = {k: v.format(receiver=receiver) for k, v in TRACING_ENV.get(variant, {}).items()}
    return {"PAYMESH_INSECURE": "1", **settings}


async def _in_contexts(
    stub: Any, contexts: Sequence[otel_context.Context], **options: Any
) -> list[float]:
    out: list[float] = []
    for context in contexts:
        token = otel_context.attach(context)
        try:
            out += await latencies(stub, 1, **options)
        finally:
            otel_context.detach(token)
    return out


async def _overhead(address: str, receiver: str, calls: int, rounds: int) -> dict[str, Any]:
    stubs: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {v: {} for v in VARIANTS}
    closers: list[Callable[[], Awaitable[None]]] = []
    providers = []
    # What a variant leaves to do after its calls (the chain's batched telemetry, the span
    # exporter's queue), done at the end of its own round: its CPU is charged to it, and none
    # of it runs in the timed calls of the variant measured next.
    settle: dict[str, list[Callable[[], object]]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS[1:]:
        environ = {**_environ(variant, receiver), "ORDER_SERVICE_ADDR": address}
        runtime = connect(load_config(CALLER, Topology(environ=environ)), ())
        stubs[variant] = runtime.context.clients.stub(TARGET, testing_pb2_grpc.TestServiceStub)
        closers.append(runtime.context.clients.close)
        providers.append(runtime.tracer_provider)
        settle[variant].append(runtime.context.clients.chain.telemetry.flush)
        force_flush = getattr(runtime.tracer_provider, "force_flush", None)
        if force_flush is not None:
            settle[variant].append(force_flush)
    # The bare stub's channel has exactly the chain's arguments: its reconnect backoff, gRPC's
    # retries off, the balancing service config (round robin, health checks, ejection).
    channel_options = runtime.context.clients.channel_options(TARGET)
    bare_channel = aio.insecure_channel(address, options=channel_options)
    closers.append(bare_channel.close)
    stubs["bare"] = testing_pb2_grpc.TestServiceStub(bare_channel)
    options["bare"] = {"timeout": 5.0}  # the chain sends the policy's 5 s
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    # Each round's median per variant: the ratio within one round is measured a few hundred
    # milliseconds apart, so minute-to-minute drift of the shared machine cancels out of it.
    round_medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_s: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    per_round = max(1, calls // rounds)
    for variant in VARIANTS:  # warm up
        await _in_contexts(stubs[variant], _handler_contexts(variant, 200), **options[variant])
    for _ in range(rounds):  # interleaved, in a fresh order, so drift hits all alike
        for variant in random.sample(VARIANTS, len(VARIANTS)):
            contexts = _handler_contexts(variant, per_round)
            before = time.process_time()
            measured = await _in_contexts(stubs[variant], contexts, **options[variant])
            samples[variant] += measured
            round_medians[variant].append(statistics.median(measured))
            for step in settle[variant]:
                step()
            cpu_s[variant] += time.process_time() - before
    for close in closers:
        await close()
    for provider in providers:
        provider.shutdown()
    figures: dict[str, Any] = {
        v: {**_summary(samples[v]), "client_cpu_us": cpu_s[v] / len(samples[v]) * 1e6}
        for v in VARIANTS
    }
    bare, chain = figures["bare"], figures["chain"]
    rounds_both = zip(round_medians["chain"], round_medians["bare"], strict=True)
    paired = sorted(chain_median / bare_median for chain_median, bare_median in rounds_both)
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return {
        **figures,
        "ratio_median": chain["median_us"] / bare["median_us"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_quartiles": [quartiles[0], quartiles[2]],
        "ratio_p99": chain["p99_us"] / bare["p99_us"],
        "ratio_client_cpu": chain["client_cpu_us"] / bare["client_cpu_us"],
        "exported_default_ratio_median": figures["exported_default"]["median_us"]
        / bare["median_us"],
        "exported_all_ratio_median": figures["exported_all"]["median_us"] / bare["median_us"],
        "recorded_span_cost_us": {
            "median": figures["exported_all"]["median_us"] - chain["median_us"],
            "client_cpu": figures["exported_all"]["client_cpu_us"] - chain["client_cpu_us"],
        },
    }


async def _outage(address: str, calls: int) -> dict[str, Any]:
    no_breaker = {"breaker": {"minimum_calls": 1_000_000, "consecutive_failures": 1_000_000}}
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


async def _main(calls: int, rounds: int) -> None:
    ok_server, ok_address = _start_server(failing=False)
    down_server, down_address = _start_server(failing=True)
    receiver, receiver_address = _start("--receive")
    try:
        overhead = await _overhead(ok_address, receiver_address, calls, rounds)
        outage = await _outage(down_address, 200)
    finally:
        for process in (ok_server, down_server, receiver):
            process.terminate()
            process.wait()
    bare = overhead["bare"]
    print(f"{'client':17} {'median':>9} {'p99':>9} {'CPU/call':>9}  median, p99 to bare")
    for label in VARIANTS:
        f = overhead[label]
        print(
            f"{label:17} {f['median_us']:7.1f}us {f['p99_us']:7.1f}us {f['client_cpu_us']:7.1f}us"
            f"  {f['median_us'] / bare['median_us']:.3f}x, {f['p99_us'] / bare['p99_us']:.3f}x"
        )
    print(
        f"production chain vs bare stub, same channel options, separate processes: "
        f"median {overhead['ratio_median']:.3f}x (goal <= 1.05), p99 {overhead['ratio_p99']:.3f}x"
    )
    low, high = overhead["paired_ratio_quartiles"]
    print(
        f"the same, round by round ({rounds} rounds, variants interleaved): median of the rounds' "
        f"ratios {overhead['paired_ratio_median']:.3f}x, quartiles {low:.3f}x-{high:.3f}x"
    )
    cost = overhead["recorded_span_cost_us"]
    print(
        f"spans exported (receiver drops them): default sampler "
        f"{overhead['exported_default_ratio_median']:.3f}x, every call recorded "
        f"{overhead['exported_all_ratio_median']:.3f}x; a recorded call costs "
        f"{cost['median']:.0f} us latency, {cost['client_cpu']:.0f} us client CPU"
    )
    print(
        f"open-breaker rejection median {outage['open_breaker']['median_us']:.1f} us (goal <= 50)"
    )
    print(
        f"attempts per call in an outage: {outage['with_budget']:.2f} with budget, "
        f"{outage['without_budget']:.2f} without"
    )
    print(
        json.dumps(
            {"bench": "chain_overhead", "calls": calls, "rounds": rounds, **overhead, **outage}
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--failing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        asyncio.run(_serve(options.failing))
    elif options.receive:
        asyncio.run(_receive())
    else:
        asyncio.run(_main(options.calls, options.rounds))
