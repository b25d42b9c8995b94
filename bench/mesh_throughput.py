"""Mesh throughput: CreatePayment end to end at rising concurrency, and one hop's echo ceiling.

Starts the eleven services and the partner sandbox as real processes on free loopback ports
(the launcher of ``make run``), onboards a merchant, then runs closed-loop CreatePayment
workers (unique ``request_id`` each) at concurrency 1, 8, 32, 64 and prints RPS, p50 and p99.
For scale, the bare echo of one hop (the TestService of ``bench.chain_overhead`` in its own
process, a bare stub) at concurrency 1 and 64. The load generator shares the machine with
the mesh, so these are this machine's figures, not the mesh's limit. Ends with one JSON line.
``python -m bench.mesh_throughput [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.chain_overhead import _start_server  # noqa: E402
from paymesh.common.v1 import common_pb2  # noqa: E402
from paymesh.merchant.v1 import merchant_pb2, merchant_pb2_grpc  # noqa: E402
from paymesh.merchant_auth.v1 import merchant_auth_pb2, merchant_auth_pb2_grpc  # noqa: E402
from paymesh.payment_gateway.v1 import payment_gateway_pb2 as pg  # noqa: E402
from paymesh.payment_gateway.v1 import payment_gateway_pb2_grpc  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.tools.launcher import Mesh, ephemeral_environ  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)


def _summary(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {
        "rps": len(ordered) / seconds,
        "p50_ms": pct(0.5) if ordered else None,
        "p99_ms": pct(0.99) if ordered else None,
        "ok": len(ordered),
        "errors": errors,
    }


async def _closed_loop(call: Any, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` workers calling ``call()`` back to back for ``seconds``."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await call()
            except aio.AioRpcError as err:
                errors[err.code().name] += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result = _summary(latencies, sum(errors.values()), time.perf_counter() - began)
    if errors:
        result["error_codes"] = dict(errors)
    return result


async def _onboard(mesh: Mesh) -> tuple[str, str]:
    operator = mesh.operator
    merchant_address = mesh.members["merchant-service"].address
    async with operator.aio_channel("merchant-service", merchant_address) as m_channel:
        merchant = (
            await merchant_pb2_grpc.MerchantServiceStub(m_channel).CreateMerchant(
                merchant_pb2.CreateMerchantRequest(
                    request_id=f"bench-onboard-{uuid.uuid4().hex}",
                    name="Bench Shop",
                    email="bench@example.com",
                    country_code="DE",
                    default_currency_code="EUR",
                    webhook_url="https://merchant.example/hooks",
                ),
                timeout=10,
            )
        ).merchant
    auth_address = mesh.members["merchant-auth-service"].address
    async with operator.aio_channel("merchant-auth-service", auth_address) as a_channel:
        key = await merchant_auth_pb2_grpc.MerchantAuthServiceStub(a_channel).IssueApiKey(
            merchant_auth_pb2.IssueApiKeyRequest(
                request_id=f"bench-key-{uuid.uuid4().hex}",
                merchant_id=merchant.merchant_id,
                label="bench",
            ),
            timeout=10,
        )
    return merchant.merchant_id, key.secret


async def _payments(mesh: Mesh, seconds: float) -> dict[str, Any]:
    merchant_id, api_key = await _onboard(mesh)
    results: dict[str, Any] = {}
    # As a merchant calls it: the gateway's public TLS port, the API key in metadata.
    public = mesh.members["payment-gateway"].public_address
    key = (("authorization", f"Bearer {api_key}"),)
    async with mesh.operator.merchant_aio_channel("payment-gateway", public) as channel:
        gateway = payment_gateway_pb2_grpc.PaymentGatewayServiceStub(channel)

        async def create() -> None:
            reply = await gateway.CreatePayment(
                pg.CreatePaymentRequest(
                    request_id=uuid.uuid4().hex,
                    merchant_id=merchant_id,
                    amount=common_pb2.Money(amount_minor=1250, currency_code="EUR"),
                    payment_method_token="tok_visa",
                    customer_ip="192.0.2.10",
                    description="bench",
                ),
                timeout=10,
                metadata=key,
            )
            if reply.payment.status != pg.PAYMENT_STATUS_SUCCEEDED:
                raise RuntimeError(f"payment ended {pg.PaymentStatus.Name(reply.payment.status)}")

        await _closed_loop(create, 4, 1.0)  # warm-up: connections, caches, SQLite pages
        for concurrency in CONCURRENCY:
            results[str(concurrency)] = await _closed_loop(create, concurrency, seconds)
            r = results[str(concurrency)]
            print(
                f"CreatePayment  concurrency {concurrency:3}: {r['rps']:7.1f} rps  "
                f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}",
                flush=True,
            )
    return results


async def _echo(seconds: float) -> dict[str, Any]:
    server, address = _start_server(failing=False)
    results: dict[str, Any] = {}
    try:
        async with aio.insecure_channel(address) as channel:
            stub = testing_pb2_grpc.TestServiceStub(channel)
            request = testing_pb2.ReadRequest(text="x")

            async def read() -> None:
                await stub.Read(request, timeout=5)

            await _closed_loop(read, 4, 1.0)
            for concurrency in (1, 64):
                results[str(concurrency)] = await _closed_loop(read, concurrency, seconds)
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


async def _main(seconds: float) -> dict[str, Any]:
    print(f"mesh throughput on {os.cpu_count()} cores, {seconds:g} s per level", flush=True)
    with tempfile.TemporaryDirectory(prefix="paymesh-bench-") as var_dir:
        mesh = Mesh(environ=ephemeral_environ(), var_dir=Path(var_dir))
        mesh.start(timeout_s=90)
        try:
            payments = await _payments(mesh, seconds)
        finally:
            mesh.stop()
    echo = await _echo(seconds / 2)
    ceiling = echo["64"]["rps"]
    line = {
        "bench": "mesh_throughput",
        "cores": os.cpu_count(),
        "seconds_per_level": seconds,
        "create_payment": payments,
        "echo_one_hop": echo,
        "create_payment_rps_share_of_echo_ceiling": max(r["rps"] for r in payments.values())
        / ceiling,
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level")
    options = parser.parse_args()
    asyncio.run(_main(options.seconds))
