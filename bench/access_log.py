"""Server CPU per call of the access log: a bare grpc.aio server vs the policy interceptor with
success lines off (the default, INFO) and on (``PAYMESH_LOG_LEVEL=DEBUG``), side by side.

Each server is its own process logging as a service does (to a file); its CPU time over a
loop of sequential calls, divided by the calls, is the figure. Prints figures, never pass/fail.
``python -m bench.access_log [--calls N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from paymesh.testing.v1 import testing_pb2, testing_pb2_grpc  # noqa: E402
from services.mesh.bootstrap import configure_logging  # noqa: E402
from services.mesh.server import ServerPolicyInterceptor  # noqa: E402

#: Row name: (whether the policy interceptor runs, PAYMESH_LOG_LEVEL of the server).
ROWS = {
    "bare grpc.aio": (False, "INFO"),
    "policy, INFO (default)": (True, "INFO"),
    "policy, DEBUG (every line)": (True, "DEBUG"),
}


class _Echo(testing_pb2_grpc.TestServiceServicer):
    async def Read(self, request: Any, context: Any) -> testing_pb2.ReadResponse:
        return testing_pb2.ReadResponse(text=request.text)


async def _serve(policy: bool) -> None:
    configure_logging("bench-target")
    interceptors = [ServerPolicyInterceptor(domain="bench-target")] if policy else []
    server = aio.server(interceptors=interceptors)
    testing_pb2_grpc.add_TestServiceServicer_to_server(
        _Echo(),  # type: ignore[abstract]  # serves only what the benchmark calls
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(policy: bool, level: str, calls: int, log_dir: Path) -> float:
    """Server CPU microseconds per call of one server process."""
    with (log_dir / f"{policy}-{level}.log").open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", *(["--policy"] if policy else [])],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PAYMESH_LOG_LEVEL": level},
        )
    try:
        assert server.stdout is not None
        with grpc.insecure_channel(f"127.0.0.1:{server.stdout.readline().strip()}") as channel:
            stub = testing_pb2_grpc.TestServiceStub(channel)
            request = testing_pb2.ReadRequest(text="x")
            for _ in range(200):  # warm up: connection, handler lookup, caches
                stub.Read(request, timeout=5)
            before = _cpu_s(server.pid)
            for _ in range(calls):
                stub.Read(request, timeout=5)
            return (_cpu_s(server.pid) - before) / calls * 1e6
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    """Rounds interleaved row by row, so drift of the machine's load hits every row alike."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        import asyncio

        asyncio.run(_serve(args.policy))
        return
    samples: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for row, (policy, level) in ROWS.items():
                samples[row].append(_round(policy, level, args.calls, Path(log_dir)))
    bare = statistics.median(samples["bare grpc.aio"])
    result = {}
    for row, values in samples.items():
        median = statistics.median(values)
        result[row] = {"server_cpu_us_per_call": round(median, 1), "ratio": round(median / bare, 3)}
        print(f"{row:28} {median:7.1f} us server CPU per call  {median / bare:5.2f}x bare")
    print(json.dumps({"access_log": result}))


if __name__ == "__main__":
    main()
