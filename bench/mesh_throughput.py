"""Mesh throughput: CreatePayment end to end at rising concurrency, its CPU and memory per service.

Starts the eleven services and the partner sandbox as real processes (the launcher of ``make
run``), onboards many merchants, then runs closed-loop CreatePayment workers at concurrency 1, 8,
32, 64 on a cache-cold workload: every payment a random merchant and API key, a fresh customer IP
(geo-IP misses), one of ten currencies (half cross-currency, so exchange rates are looked up),
some card and risk declines (answers, not errors). Beside it one cache-warm level (one merchant,
key, IP, currency). Per level: payments/s, p50/p99, and CPU per payment of every process from
/proc (services, partner sandbox and load generator apart). RSS per service idle, after the run,
and after a second identical c=32 run (growth). For scale, one bare echo hop. Ends with one JSON
line. ``python -m bench.mesh_throughput [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.chain_overhead import _start_server  # noqa: E402
from bench.server_hop import cpu_s as _cpu_s  # noqa: E402
from paymesh.common.v1 import common_pb2  # noqa: E402
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc  # noqa: E402
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc  # noqa: E402
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg  # noqa: E402
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.channel_adapter.config import DEFAULT_RATE_TTL_S, RATE_TTL_VAR  # noqa: E402
from services.mesh.topology import SERVICES  # noqa: E402
from services.mesh.validation import CURRENCY_EXPONENT  # noqa: E402
from services.tools.launcher import Mesh, ephemeral_environ, render_table  # noqa: E402
from services.tools.sandbox.app import USD_RATES  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)
#: The level of the issue's goals: the cache-warm row and the memory re-run use it.
GOAL_CONCURRENCY = 32
#: Rounds the goal level's window is cut into, alternating the cold and the warm workload.
ALTERNATING_ROUNDS = 2
MERCHANTS = 50
#: Every how many merchants one has a second API key (merchants rotate keys).
SECOND_KEY_EVERY = 5
#: Exchange-rate cache TTL of the bench's channel-adapter: short, so that over one level's
#: window cross-currency payments keep looking rates up (the deployed default is longer).
BENCH_RATE_TTL_S = 5.0
CROSS_CURRENCY_SHARE = 0.5
#: The partner sandbox declines a card token starting with ``tok_decline``.
CARD_DECLINE_SHARE = 0.05
#: The sandbox's geo-IP puts 203.0.113.x (TEST-NET-3) in a high-risk country: risk declines.
RISK_DECLINE_SHARE = 0.03
COUNTRIES = ("US", "DE", "GB", "FR", "JP", "CN", "CA", "AU", "SG", "BR")
#: After a window, wait until the mesh is quiet (deferred work done, e.g. outbox effects)
#: before reading CPU: at most this long, quiet meaning under QUIET_CORE_SHARE of one core.
SETTLE_MAX_S = 5.0
SETTLE_POLL_S = 0.25
QUIET_CORE_SHARE = 0.05
QUIET_POLLS = 2
MEMORY_GROWTH_GOAL = 0.05
SERVICE_NAMES = tuple(spec.name for spec in SERVICES)
LOAD_GENERATOR = "load-generator"


# --- /proc readings -------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def member_pids(mesh: Mesh) -> dict[str, int]:
    """Every running member's pid by name, and this process as the load generator."""
    pids = {name: pid for name in mesh.members if (pid := mesh.pid(name)) is not None}
    pids[LOAD_GENERATOR] = os.getpid()
    return pids


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: _cpu_s(pid) for name, pid in pids.items()}


def _mesh_cpu(snapshot: Mapping[str, float]) -> float:
    return sum(s for name, s in snapshot.items() if name != LOAD_GENERATOR)


async def settle(pids: Mapping[str, int]) -> float:
    """Wait until the mesh's processes use under QUIET_CORE_SHARE of a core (for QUIET_POLLS
    polls of SETTLE_POLL_S in a row, at most SETTLE_MAX_S); the seconds waited."""
    began = time.perf_counter()
    last = _mesh_cpu(cpu_snapshot(pids))
    quiet = 0
    # Quiet for QUIET_POLLS polls in a row: a relay that wakes on a timer has had its turn.
    while quiet < QUIET_POLLS and time.perf_counter() - began < SETTLE_MAX_S:
        await asyncio.sleep(SETTLE_POLL_S)
        now = _mesh_cpu(cpu_snapshot(pids))
        quiet = quiet + 1 if now - last <= QUIET_CORE_SHARE * SETTLE_POLL_S else 0
        last = now
    return time.perf_counter() - began


def cpu_per_payment(spent_s: Mapping[str, float], payments: int) -> dict[str, Any]:
    """CPU ms per answered payment: the eleven services (total and each, with its share), the
    other members (partner sandbox, console) and the load generator, each apart."""
    per = max(payments, 1)
    spent: dict[str, float] = {}
    for name, s in spent_s.items():
        # A replica (``payment-gateway#1``) counts as its service.
        service = name.split("#", 1)[0]
        spent[service] = spent.get(service, 0.0) + s * 1000 / per
    services = {n: spent[n] for n in SERVICE_NAMES if n in spent}
    total = sum(services.values())
    return {
        "mesh_ms": total,
        "services_ms": services,
        "services_share": {n: (v / total if total else 0.0) for n, v in services.items()},
        "others_ms": {n: v for n, v in spent.items() if n not in services and n != LOAD_GENERATOR},
        "load_generator_ms": spent[LOAD_GENERATOR],
    }


# --- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Merchant:
    """One onboarded merchant as a client of the public port."""

    merchant_id: str
    currency: str
    """Its default currency, the settlement currency of its payments."""
    keys: tuple[tuple[tuple[str, str], ...], ...]
    """Call metadata per API key it holds."""


async def _onboard_one(mesh: Mesh, index: int, currency: str, country: str, keys: int) -> Merchant:
    operator = mesh.operator
    async with operator.aio_channel(
        "merchant-service", mesh.members["merchant-service"].address
    ) as channel:
        merchant = (
            await merchant_pb2_grpc.MerchantServiceStub(channel).CreateMerchant(
                merchant_pb2.CreateMerchantRequest(
                    request_id=f"bench-onboard-{uuid.uuid4().hex}",
                    name=f"Bench Shop {index}",
                    email=f"bench{index}@example.com",
                    country_code=country,
                    default_currency_code=currency,
                    webhook_url=f"https://merchant{index}.example/hooks",
                ),
                timeout=10,
            )
        ).merchant
    metadata = []
    async with operator.aio_channel(
        "merchant-auth-service", mesh.members["merchant-auth-service"].address
    ) as channel:
        auth = merchant_auth_pb2_grpc.MerchantAuthServiceStub(channel)
        for k in range(keys):
            key = await auth.IssueApiKey(
                merchant_auth_pb2.IssueApiKeyRequest(
                    request_id=f"bench-key-{uuid.uuid4().hex}",
                    merchant_id=merchant.merchant_id,
                    label=f"bench-{k}",
                ),
                timeout=10,
            )
            metadata.append((("authorization", f"Bearer {key.secret}"),))
    return Merchant(merchant.merchant_id, currency, tuple(metadata))


async def onboard(mesh: Mesh, count: int) -> list[Merchant]:
    """``count`` merchants over every currency, every SECOND_KEY_EVERY-th with two keys."""
    currencies = sorted(CURRENCY_EXPONENT)
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> Merchant:
        async with gate:
            return await _onboard_one(
                mesh,
                i,
                currencies[i % len(currencies)],
                COUNTRIES[i % len(COUNTRIES)],
                2 if i % SECOND_KEY_EVERY == 0 else 1,
            )

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def _public_ip(rng: random.Random) -> str:
    """A random unicast address outside the ranges the sandbox treats specially."""
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        # 198.51.100.x is a proxy and 203.0.113.x high-risk to the sandbox: kept for declines.
        if address.is_global and not address.is_multicast and address.packed[0] not in (198, 203):
            return str(address)


def _amount_minor(rng: random.Random, currency: str) -> int:
    """A plausible amount: 1 to 400 USD worth in ``currency``, below every review limit."""
    major = Decimal(str(round(rng.uniform(1, 400), 2))) * Decimal(USD_RATES[currency])
    return max(1, int(major.scaleb(CURRENCY_EXPONENT[currency])))


@dataclass(frozen=True, slots=True)
class Payment:
    """One CreatePayment of the workload: the request and the merchant's call metadata."""

    request: pg.CreatePaymentRequest
    metadata: tuple[tuple[str, str], ...]
    merchant: int


class ColdWorkload:
    """Payments spread over every merchant, key, currency; a fresh customer IP each."""

    def __init__(self, merchants: list[Merchant], seed: int = 11) -> None:
        self.merchants = merchants
        self._rng = random.Random(seed)
        self._currencies = sorted(CURRENCY_EXPONENT)

    def next(self, index: int | None = None) -> Payment:
        """The next payment, of a random merchant or of merchant ``index``."""
        rng = self._rng
        if index is None:
            index = rng.randrange(len(self.merchants))
        merchant = self.merchants[index]
        currency = merchant.currency
        if rng.random() < CROSS_CURRENCY_SHARE:
            currency = rng.choice([c for c in self._currencies if c != merchant.currency])
        token = "tok_visa"
        ip = _public_ip(rng)
        roll = rng.random()
        if roll < CARD_DECLINE_SHARE:
            token = "tok_decline_insufficient_funds"
        elif roll < CARD_DECLINE_SHARE + RISK_DECLINE_SHARE:
            ip = f"203.0.113.{rng.randint(1, 254)}"
        return Payment(
            pg.CreatePaymentRequest(
                request_id=uuid.uuid4().hex,
                merchant_id=merchant.merchant_id,
                amount=common_pb2.Money(
                    amount_minor=_amount_minor(rng, currency), currency_code=currency
                ),
                settlement_currency_code=merchant.currency,
                payment_method_token=token,
                customer_ip=ip,
                customer_country_code=rng.choice(COUNTRIES) if rng.random() < 0.5 else "",
                description="bench",
                merchant_order_reference=f"order-{rng.randrange(10**9)}",
            ),
            rng.choice(merchant.keys),
            index,
        )


class WarmWorkload:
    """The old workload: one merchant, one key, one IP, EUR to EUR, never declined."""

    def __init__(self, merchant: Merchant) -> None:
        self.merchants = [merchant]

    def next(self) -> Payment:
        merchant = self.merchants[0]
        return Payment(
            pg.CreatePaymentRequest(
                request_id=uuid.uuid4().hex,
                merchant_id=merchant.merchant_id,
                amount=common_pb2.Money(amount_minor=1250, currency_code=merchant.currency),
                payment_method_token="tok_visa",
                customer_ip="192.0.2.10",
                description="bench",
            ),
            merchant.keys[0],
            0,
        )


# --- the closed loop ------------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    """What one or more closed-loop windows of one workload gathered."""

    latencies: list[float] = field(default_factory=list)
    """Seconds per answered call."""
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    """Length of the windows together."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process over the windows and their settling."""
    settle_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not ordered:
                return None
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

        result: dict[str, Any] = {
            "rps": len(ordered) / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "ok": len(ordered),
            "errors": sum(self.errors.values()),
            "outcomes": dict(self.outcomes),
        }
        if self.errors:
            result["error_codes"] = dict(self.errors)
        if self.cpu_s:
            result["settle_s"] = self.settle_s
            result["cpu_ms_per_payment"] = cpu_per_payment(self.cpu_s, len(ordered))
        return result


async def _closed_loop(
    call: Callable[[], Awaitable[str]],
    concurrency: int,
    seconds: float,
    samples: Samples | None = None,
) -> Samples:
    """``concurrency`` workers calling ``call()`` back to back for ``seconds``, into
    ``samples``; ``call`` returns the answer's outcome (counted), a gRPC error or an
    unexpected outcome is an error."""
    samples = Samples() if samples is None else samples
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                samples.outcomes[await call()] += 1
            except aio.AioRpcError as err:
                samples.errors[err.code().name] += 1
                continue
            except UnexpectedOutcome as err:
                samples.errors[str(err)] += 1
                continue
            samples.latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.seconds += time.perf_counter() - began
    return samples


class UnexpectedOutcome(Exception):
    """A CreatePayment answer neither succeeded nor declined."""


ANSWERED = {
    pg.PAYMENT_STATUS_SUCCEEDED: "succeeded",
    pg.PAYMENT_STATUS_DECLINED: "declined",
}


class Gateway:
    """The merchants' side of the public TLS port: one channel per merchant, as each dials."""

    def __init__(
        self, mesh: Mesh, merchants: list[Merchant], members: Sequence[str] = ("payment-gateway",)
    ) -> None:
        # Several gateway replicas: merchant i dials replica i mod n, as behind a balancer.
        public = [mesh.members[name].public_address for name in members]
        self._channels = [
            mesh.operator.merchant_aio_channel("payment-gateway", public[i % len(public)])
            for i in range(len(merchants))
        ]
        self._stubs = [
            payment_gateway_pb2_grpc.PaymentGatewayServiceStub(c) for c in self._channels
        ]

    async def create(self, payment: Payment) -> str:
        reply = await self._stubs[payment.merchant].CreatePayment(
            payment.request, timeout=10, metadata=payment.metadata
        )
        outcome = ANSWERED.get(reply.payment.status)
        if outcome is None:
            raise UnexpectedOutcome(pg.PaymentStatus.Name(reply.payment.status))
        return outcome

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))


async def measured_level(
    gateway: Gateway,
    workload: ColdWorkload | WarmWorkload,
    concurrency: int,
    seconds: float,
    pids: Mapping[str, int],
    samples: Samples | None = None,
) -> Samples:
    """One closed-loop window into ``samples``, with the CPU every process spent on it (until
    the mesh settles, so work deferred past the replies is charged to it too)."""

    async def create() -> str:
        return await gateway.create(workload.next())

    before = cpu_snapshot(pids)
    samples = await _closed_loop(create, concurrency, seconds, samples)
    samples.settle_s += await settle(pids)
    for name, spent in cpu_snapshot(pids).items():
        samples.cpu_s[name] = samples.cpu_s.get(name, 0.0) + spent - before[name]
    return samples


def _level_line(label: str, r: Mapping[str, Any]) -> str:
    cpu = r["cpu_ms_per_payment"]
    return (
        f"{label:16} {r['rps']:6.1f} pay/s  p50 {r['p50_ms'] or 0:6.0f} ms  "
        f"p99 {r['p99_ms'] or 0:6.0f} ms  declined {r['outcomes'].get('declined', 0):4}  "
        f"errors {r['errors']:3}  mesh CPU {cpu['mesh_ms']:5.2f} ms/payment"
    )


def level_table(levels: Mapping[str, Mapping[str, Any]]) -> str:
    """Every level side by side: throughput, latency, answers, then the CPU ms per payment of
    each service (with its share of the eleven), heaviest first, and of the other processes."""
    columns = list(levels.values())
    cpus = [r["cpu_ms_per_payment"] for r in columns]
    rows: list[tuple[str, ...]] = [
        ("payments/s", *(f"{r['rps']:.1f}" for r in columns)),
        ("p50 / p99 ms", *(f"{r['p50_ms'] or 0:.0f} / {r['p99_ms'] or 0:.0f}" for r in columns)),
        (
            "declined / errors",
            *(f"{r['outcomes'].get('declined', 0)} / {r['errors']}" for r in columns),
        ),
    ]
    names = sorted(cpus[0]["services_ms"], key=lambda n: -cpus[0]["services_ms"][n])
    for name in names:
        cells = (f"{c['services_ms'][name]:.2f} ({c['services_share'][name]:.0%})" for c in cpus)
        rows.append((f"  {name}", *cells))
    rows.append(("CPU ms/payment, 11 services", *(f"{c['mesh_ms']:.2f}" for c in cpus)))
    for other in cpus[0]["others_ms"]:
        rows.append((f"  {other} (apart)", *(f"{c['others_ms'][other]:.2f}" for c in cpus)))
    rows.append(("  load generator (apart)", *(f"{c['load_generator_ms']:.2f}" for c in cpus)))
    return render_table(rows, ("CreatePayment", *levels))


# --- memory ---------------------------------------------------------------------------------


def rss_snapshot(pids: Mapping[str, int]) -> dict[str, int]:
    return {name: rss_kib(pid) for name, pid in pids.items() if name != LOAD_GENERATOR}


def memory_table(memory: Mapping[str, Any]) -> str:
    rows = []
    for name, idle in memory["idle_kib"].items():
        run1, run2 = memory["after_run1_kib"][name], memory["after_run2_kib"][name]
        rows.append(
            (
                name,
                f"{idle / 1024:.1f}",
                f"{run1 / 1024:.1f}",
                f"{run2 / 1024:.1f}",
                f"{memory['growth_run1_to_run2'][name]:+.1%}",
            )
        )
    return render_table(rows, ("RSS MiB", "idle", "after run 1", "after run 2", "growth 1->2"))


# --- the runs -------------------------------------------------------------------------------


async def _payments(mesh: Mesh, seconds: float) -> dict[str, Any]:
    pids = member_pids(mesh)
    merchants = await onboard(mesh, MERCHANTS)
    warm_merchant = (await onboard(mesh, 1))[0]
    cold = ColdWorkload(merchants)
    warm = WarmWorkload(warm_merchant)
    gateway = Gateway(mesh, [*merchants])
    warm_gateway = Gateway(mesh, [warm_merchant])
    try:
        # Warm-up, not measured: every merchant's connection and the processes' code paths.
        for index in range(len(merchants)):
            await gateway.create(cold.next(index))
        await _closed_loop(lambda: warm_gateway.create(warm.next()), 4, 1.0)
        await _closed_loop(lambda: gateway.create(cold.next()), 4, 1.0)
        await settle(pids)
        idle_before = cpu_snapshot(pids)
        await asyncio.sleep(1.0)
        idle_cpu = {
            n: (s - idle_before[n]) * 1000 for n, s in cpu_snapshot(pids).items()
        }  # ms per second of the idle mesh, for judging the settle time's share
        memory: dict[str, Any] = {"idle_kib": rss_snapshot(pids)}

        cold_levels: dict[str, Any] = {}
        warm_samples = Samples()
        for concurrency in CONCURRENCY:
            if concurrency != GOAL_CONCURRENCY:
                cold_levels[str(concurrency)] = (
                    await measured_level(gateway, cold, concurrency, seconds, pids)
                ).summary()
            else:
                # Cold and warm side by side: alternating rounds, so a neighbour's load on
                # the shared machine falls on both alike.
                cold_samples = Samples()
                for _ in range(ALTERNATING_ROUNDS):
                    round_s = seconds / ALTERNATING_ROUNDS
                    await measured_level(gateway, cold, concurrency, round_s, pids, cold_samples)
                    await measured_level(
                        warm_gateway, warm, concurrency, round_s, pids, warm_samples
                    )
                cold_levels[str(concurrency)] = cold_samples.summary()
            print(_level_line(f"cold  c={concurrency}", cold_levels[str(concurrency)]), flush=True)
            if concurrency == GOAL_CONCURRENCY:
                print(_level_line(f"warm  c={concurrency}", warm_samples.summary()), flush=True)
        warm_level = warm_samples.summary()
        memory["after_run1_kib"] = rss_snapshot(pids)
        # The memory re-run: the same cold workload at the goal level, then RSS again.
        rerun = (await measured_level(gateway, cold, GOAL_CONCURRENCY, seconds, pids)).summary()
        print(_level_line(f"cold  c={GOAL_CONCURRENCY} run 2", rerun), flush=True)
        memory["after_run2_kib"] = rss_snapshot(pids)
    finally:
        await gateway.close()
        await warm_gateway.close()
    memory["growth_run1_to_run2"] = {
        n: (memory["after_run2_kib"][n] - v) / v if v else 0.0
        for n, v in memory["after_run1_kib"].items()
    }
    services_growth = [memory["growth_run1_to_run2"][n] for n in SERVICE_NAMES]
    memory["max_service_growth"] = max(services_growth)
    memory["goal_max_growth"] = MEMORY_GROWTH_GOAL
    memory["run1_payments"] = sum(r["ok"] for r in cold_levels.values()) + warm_level["ok"]
    memory["run2_payments"] = rerun["ok"]
    print()
    table: dict[str, Any] = {}
    for c, r in cold_levels.items():
        table[f"cold c={c}"] = r
        if c == str(GOAL_CONCURRENCY):
            table[f"warm c={c}"] = warm_level
    print(level_table(table), flush=True)
    print()
    print(memory_table(memory), flush=True)
    print(
        f"largest service RSS growth run 1 -> run 2: {memory['max_service_growth']:+.1%} "
        f"(goal <= {MEMORY_GROWTH_GOAL:.0%}; run 1: {memory['run1_payments']} payments at every "
        f"level, run 2: {rerun['ok']} more cold payments at c={GOAL_CONCURRENCY})",
        flush=True,
    )
    return {
        "create_payment": cold_levels,
        "create_payment_warm": {str(GOAL_CONCURRENCY): warm_level},
        "create_payment_run2": {str(GOAL_CONCURRENCY): rerun},
        "idle_cpu_ms_per_s": idle_cpu,
        "memory": memory,
    }


async def _echo(seconds: float) -> dict[str, Any]:
    server, address = _start_server(failing=False)
    results: dict[str, Any] = {}
    try:
        async with aio.insecure_channel(address) as channel:
            stub = testing_pb2_grpc.TestServiceStub(channel)
            request = testing_pb2.ReadRequest(text="x")

            async def read() -> str:
                await stub.Read(request, timeout=5)
                return "ok"

            await _closed_loop(read, 4, 1.0)
            for concurrency in (1, 64):
                results[str(concurrency)] = (
                    await _closed_loop(read, concurrency, seconds)
                ).summary()
                r = results[str(concurrency)]
                print(
                    f"echo one hop   concurrency {concurrency:3}: {r['rps']:7.1f} rps  "
                    f"p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait()
    return results


async def _main(seconds: float, rate_ttl_s: float, with_console: bool) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    print(
        f"mesh throughput on {os.cpu_count()} cores (load average {load_at_start[0]:.2f}), "
        f"{seconds:g} s per level; cold workload: {MERCHANTS} merchants, fresh customer IPs, "
        f"{len(CURRENCY_EXPONENT)} currencies ({CROSS_CURRENCY_SHARE:.0%} cross-currency, rate "
        f"TTL {rate_ttl_s:g} s, deployed default {DEFAULT_RATE_TTL_S:g} s), "
        f"{CARD_DECLINE_SHARE:.0%} card and {RISK_DECLINE_SHARE:.0%} risk declines",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="paymesh-bench-") as var_dir:
        environ = ephemeral_environ()
        environ[RATE_TTL_VAR] = str(rate_ttl_s)
        mesh = Mesh(environ=environ, var_dir=Path(var_dir), with_console=with_console)
        mesh.start(timeout_s=90)
        try:
            payments = await _payments(mesh, seconds)
        finally:
            mesh.stop()
    echo = await _echo(seconds / 2)
    ceiling = echo["64"]["rps"]
    goal = payments["create_payment"][str(GOAL_CONCURRENCY)]
    line = {
        "bench": "mesh_throughput",
        "cores": os.cpu_count(),
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
        "seconds_per_level": seconds,
        "workload": {
            "merchants": MERCHANTS,
            "currencies": len(CURRENCY_EXPONENT),
            "cross_currency_share": CROSS_CURRENCY_SHARE,
            "card_decline_share": CARD_DECLINE_SHARE,
            "risk_decline_share": RISK_DECLINE_SHARE,
            "rate_ttl_s": rate_ttl_s,
        },
        **payments,
        "echo_one_hop": echo,
        "goal": {
            "concurrency": GOAL_CONCURRENCY,
            "mesh_cpu_ms_per_payment": goal["cpu_ms_per_payment"]["mesh_ms"],
            "rps": goal["rps"],
            "p99_ms": goal["p99_ms"],
            "goals": {"mesh_cpu_ms_per_payment": 8, "rps": 200, "p99_ms": 300},
        },
        "create_payment_rps_share_of_echo_ceiling": max(
            r["rps"] for r in payments["create_payment"].values()
        )
        / ceiling,
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument(
        "--rate-ttl-s",
        type=float,
        default=BENCH_RATE_TTL_S,
        help=f"channel-adapter exchange-rate cache TTL ({RATE_TTL_VAR})",
    )
    parser.add_argument(
        "--with-console",
        action="store_true",
        help="also run the mesh console (its CPU is reported apart, its polling is not)",
    )
    options = parser.parse_args()
    asyncio.run(_main(options.seconds, options.rate_ttl_s, options.with_console))
