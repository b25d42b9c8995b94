"""Benchmark of one server hop: the production server side as bootstrap builds it vs bare grpc.aio.

Each variant is its own server process of accounting-service on mTLS with the same credentials
and server options: ``bare`` (no interceptor), ``production`` (``bootstrap.make_server`` and
``register``: policy, gate, metrics, faults, limits, tracing as configured by default),
``production_debug`` (every access line written, ``PAYMESH_LOG_LEVEL=DEBUG``) and
``production_exporter`` (an OTLP endpoint set, the caller's trace unsampled). One client calls
GetBalance as settlement-service (granted it) with an unsampled ``traceparent``, as mesh callers
mostly send. Rounds interleave the variants in a fresh order; prints median latency and server
CPU per call as ratios to bare, then one JSON line. ``python -m bench.server_hop [--calls N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.chain_overhead import _summary  # noqa: E402
from paymesh.accounting.v1 import accounting_pb2, accounting_pb2_grpc  # noqa: E402
from services.mesh import bootstrap  # noqa: E402
from services.mesh.tls import PKI_DIR_VAR, TransportSecurity  # noqa: E402

SERVICE, CALLER = "accounting-service", "settlement-service"
#: Variant: the environment its server process runs with, on top of the bench's.
VARIANTS: dict[str, dict[str, str]] = {
    "bare": {},
    "production": {},
    "production_debug": {"PAYMESH_LOG_LEVEL": "DEBUG"},
    # Nothing listens there: an unsampled caller's call makes no span, so nothing is sent.
    "production_exporter": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
}
#: What a mesh caller sends: its attempt span's context, not sampled (99 % of traces).
TRACEPARENT = (("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-00"),)


class _Accounting(accounting_pb2_grpc.AccountingServiceServicer):
    async def GetBalance(
        self, request: accounting_pb2.GetBalanceRequest, context: Any
    ) -> accounting_pb2.GetBalanceResponse:
        return accounting_pb2.GetBalanceResponse()


async def _serve(variant: str) -> None:
    """One accounting-service server of ``variant``; prints its port, serves until killed."""
    bootstrap.configure_logging(SERVICE)
    config = bootstrap.load_config(SERVICE)
    registration = bootstrap.Registration(
        servicer=_Accounting(),  # type: ignore[abstract]  # serves only what the bench calls
        add_to_server=accounting_pb2_grpc.add_AccountingServiceServicer_to_server,
        service_name="paymesh.accounting.v1.AccountingService",
    )
    if variant == "bare":
        server = aio.server(options=[("grpc.so_reuseport", 0), *config.limits.grpc_options()])
        registration.add_to_server(registration.servicer, server)
    else:
        runtime = bootstrap.connect(config, ())
        server, policy = bootstrap.make_server(runtime)
        bootstrap.register(server, runtime, [registration], policy)
    port = bootstrap._listen(
        server, SERVICE, "127.0.0.1:0", config.security, require_client_cert=True
    )
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _latencies(stub: Any, calls: int) -> list[float]:
    loop = asyncio.get_running_loop()
    request = accounting_pb2.GetBalanceRequest(account_id="acc_1")
    out = []
    for _ in range(calls):
        started = loop.time()
        await stub.GetBalance(request, metadata=TRACEPARENT, timeout=5)
        out.append(loop.time() - started)
    return out


async def _run(
    servers: dict[str, subprocess.Popen[str]], calls: int, rounds: int
) -> dict[str, Any]:
    caller = TransportSecurity.from_environ(CALLER, os.environ)
    channels, stubs = {}, {}
    for variant, process in servers.items():
        assert process.stdout is not None
        address = f"127.0.0.1:{process.stdout.readline().strip()}"
        channels[variant] = caller.aio_channel(SERVICE, address)
        stubs[variant] = accounting_pb2_grpc.AccountingServiceStub(channels[variant])
        await _latencies(stubs[variant], 300)  # warm up: handshake, handler lookup, caches
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    spent: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    #: Per round, each variant's median latency over bare's in the same round (paired).
    paired: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):  # interleaved, in a fresh order, so drift hits all alike
        medians = {}
        for variant in random.sample(list(VARIANTS), len(VARIANTS)):
            before = cpu_s(servers[variant].pid)
            taken = await _latencies(stubs[variant], calls // rounds)
            spent[variant] += cpu_s(servers[variant].pid) - before
            samples[variant] += taken
            medians[variant] = statistics.median(taken)
        for variant in VARIANTS:
            paired[variant].append(medians[variant] / medians["bare"])
    for channel in channels.values():
        await channel.close()
    bare = _summary(samples["bare"])
    bare_cpu_us = spent["bare"] / len(samples["bare"]) * 1e6
    figures: dict[str, Any] = {}
    for variant in VARIANTS:
        summary = _summary(samples[variant])
        cpu_us = spent[variant] / len(samples[variant]) * 1e6
        figures[variant] = {
            **summary,
            "server_cpu_us": cpu_us,
            "ratio_median": summary["median_us"] / bare["median_us"],
            "ratio_median_paired": statistics.median(paired[variant]),
            "ratio_p99": summary["p99_us"] / bare["p99_us"],
            "ratio_server_cpu": cpu_us / bare_cpu_us,
        }
    return figures


def main(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = {**os.environ, PKI_DIR_VAR: str(Path(scratch) / "pki")}
        os.environ[PKI_DIR_VAR] = base[PKI_DIR_VAR]
        # The development PKI, made once: the servers and the client then only read it.
        TransportSecurity.from_environ(SERVICE, base)
        TransportSecurity.from_environ(CALLER, base)
        servers = {}
        for variant, extra in VARIANTS.items():
            with (Path(scratch) / f"{variant}.log").open("ab") as log:  # logs as a service does
                servers[variant] = subprocess.Popen(
                    [sys.executable, __file__, "--serve", variant],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env={**base, **extra},
                )
        try:
            figures = asyncio.run(_run(servers, calls, rounds))
        finally:
            for process in servers.values():
                process.terminate()
                process.wait()
    print(
        f"{'server (mTLS)':20} {'median':>9} {'p99':>9} {'CPU/call':>9}  "
        "latency, paired by round, CPU to bare"
    )
    for variant, f in figures.items():
        print(
            f"{variant:20} {f['median_us']:7.1f}us {f['p99_us']:7.1f}us "
            f"{f['server_cpu_us']:7.1f}us  {f['ratio_median']:.2f}x, "
            f"{f['ratio_median_paired']:.2f}x, {f['ratio_server_cpu']:.2f}x"
        )
    print(json.dumps({"bench": "server_hop", "calls": calls, "rounds": rounds, **figures}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=8000, help="calls per variant")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
    else:
        main(args.calls, args.rounds)
