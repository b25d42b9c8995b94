"""Benchmark of transport security: the same echo call over plaintext and over mTLS, warm.

One server process serves the test service on two ports, one plaintext and one requiring
mTLS with certificates of a throwaway development PKI; the client keeps one warm channel to
each and interleaves the two so machine drift hits both alike. Prints medians and the ratio
(goal <= 1.05), then one JSON line. ``python -m bench.tls_overhead [--calls N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.chain_overhead import latencies  # noqa: E402
from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.mesh import pki  # noqa: E402
from services.mesh.tls import PKI_DIR_VAR, TransportSecurity  # noqa: E402

TARGET = "order-service"  # any mesh identity: the server presents its certificate


class _Echo(testing_pb2_grpc.TestServiceServicer):
    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        return testing_pb2.ReadResponse(text=request.text)


async def _serve(pki_dir: str) -> None:
    security = TransportSecurity.from_environ(TARGET, {PKI_DIR_VAR: pki_dir})
    server = aio.server()
    testing_pb2_grpc.add_TestServiceServicer_to_server(_Echo(), server)  # type: ignore[abstract]  # serves only what the benchmark calls; the rest answer UNIMPLEMENTED
    plain = server.add_insecure_port("127.0.0.1:0")
    secure = server.add_secure_port("127.0.0.1:0", security.server_credentials())
    await server.start()
    print(plain, secure, flush=True)
    await server.wait_for_termination()


async def _measure(pki_dir: str, plain_port: str, secure_port: str, calls: int) -> dict[str, Any]:
    operator = TransportSecurity.from_environ(pki.OPERATOR, {PKI_DIR_VAR: pki_dir})
    async with (
        aio.insecure_channel(f"127.0.0.1:{plain_port}") as plain_channel,
        operator.aio_channel(TARGET, f"127.0.0.1:{secure_port}") as tls_channel,
    ):
        plain = testing_pb2_grpc.TestServiceStub(plain_channel)
        mtls = testing_pb2_grpc.TestServiceStub(tls_channel)
        await latencies(plain, 200)  # warm: connections, handshakes, code paths
        await latencies(mtls, 200)
        plain_samples: list[float] = []
        mtls_samples: list[float] = []
        for _ in range(10):
            plain_samples += await latencies(plain, calls // 10)
            mtls_samples += await latencies(mtls, calls // 10)
    plain_us = statistics.median(plain_samples) * 1e6
    mtls_us = statistics.median(mtls_samples) * 1e6
    return {
        "bench": "tls_overhead",
        "calls": calls,
        "plaintext_median_us": plain_us,
        "mtls_median_us": mtls_us,
        "ratio_median": mtls_us / plain_us,
    }


def main(calls: int) -> dict[str, Any]:
    """Start the two-port server, measure both channels side by side, print the figures."""
    with tempfile.TemporaryDirectory(prefix="paymesh-bench-pki-") as pki_dir:
        pki.ensure_dev_pki(Path(pki_dir), [TARGET, pki.OPERATOR])
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", pki_dir], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        plain_port, secure_port = server.stdout.readline().split()
        try:
            line = asyncio.run(_measure(pki_dir, plain_port, secure_port, calls))
        finally:
            server.terminate()
            server.wait()
    print(f"plaintext median {line['plaintext_median_us']:8.1f} us")
    print(f"mTLS      median {line['mtls_median_us']:8.1f} us")
    ratio = line["ratio_median"]
    print(f"ratio mTLS / plaintext (median, warm channel, goal <= 1.05): {ratio:.3f}")
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--serve", metavar="PKI_DIR", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        asyncio.run(_serve(options.serve))
    else:
        main(options.calls)
