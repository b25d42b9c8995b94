"""CreatePayment on the deployments beyond one machine, side by side: SQLite vs PostgreSQL, one
gateway vs two.

Three meshes of real processes run at once (the launcher of ``make run``): every store on its
own SQLite file with one gateway, every store on PostgreSQL (a local cluster of its own, a
schema per service) with one gateway, and the same with two gateway replicas (merchants' channels
spread over both public ports, as a load balancer in front would). Rounds alternate the three in
a fresh order at concurrency 32 on the cache-cold workload of ``bench.mesh_throughput``, so a
neighbour's load falls on all alike. Per deployment: payments/s, p50/p99, CPU per payment of the
services and, apart, of the PostgreSQL server; ratios against SQLite with one gateway. Ends with
one JSON line. ``python -m bench.mesh_deployments [--seconds 4] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from bench.mesh_throughput import (  # noqa: E402
    ColdWorkload,
    Gateway,
    Samples,
    measured_level,
    member_pids,
    onboard,
)
from bench.server_hop import cpu_s  # noqa: E402
from services.tools import postgres  # noqa: E402
from services.tools.launcher import Mesh, ephemeral_environ  # noqa: E402

CONCURRENCY = 32
MERCHANTS = 30
#: The reference row every ratio is against.
REFERENCE = "sqlite, 1 gateway"


@dataclass
class Deployment:
    """One mesh of the comparison and what its rounds gathered."""

    label: str
    engine: str
    gateways: int
    mesh: Mesh | None = None
    cluster: postgres.LocalCluster | None = None
    gateway: Gateway | None = None
    workload: ColdWorkload | None = None
    samples: Samples = field(default_factory=Samples)
    database_cpu_s: float = 0.0


def _children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (a PostgreSQL server's backends and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == parent:
            found.append(int(entry.name))
    return found


def database_cpu_s(cluster: postgres.LocalCluster | None) -> float:
    """CPU seconds of a cluster's server and its live backends so far (0 without one)."""
    if cluster is None:
        return 0.0
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for pid in (postmaster, *_children(postmaster)):
        with contextlib.suppress(OSError):
            total += cpu_s(pid)
    return total


@contextlib.contextmanager
def started(deployment: Deployment, var_dir: Path) -> Iterator[None]:
    """Start the deployment's mesh (and its PostgreSQL cluster); stop them at the end."""
    replicas = {"payment-gateway": deployment.gateways} if deployment.gateways > 1 else {}
    environ = ephemeral_environ(replicas=replicas)
    data_dir: Path | None = None
    if deployment.engine == "postgresql":
        data_dir = postgres.temporary_directory()
        deployment.cluster = postgres.LocalCluster(data_dir)
        deployment.cluster.start()
        environ["DATABASE_URL"] = deployment.cluster.create_database("paymesh")
    deployment.mesh = Mesh(environ=environ, var_dir=var_dir, replicas=replicas)
    try:
        deployment.mesh.start(timeout_s=120)
        yield
    finally:
        deployment.mesh.stop()
        if deployment.cluster is not None:
            deployment.cluster.stop()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


def _public_members(deployment: Deployment) -> Sequence[str]:
    return ["payment-gateway"] + [f"payment-gateway#{k}" for k in range(1, deployment.gateways)]


def _summary(deployment: Deployment) -> dict[str, Any]:
    result = deployment.samples.summary()
    payments = max(result["ok"], 1)
    result["database_server_cpu_ms_per_payment"] = deployment.database_cpu_s * 1000 / payments
    return result


def _line(label: str, r: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    cpu = r["cpu_ms_per_payment"]["mesh_ms"]
    db = r["database_server_cpu_ms_per_payment"]
    return (
        f"{label:26} {r['rps']:6.1f} pay/s ({r['rps'] / reference['rps']:4.2f}x)  "
        f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms "
        f"({r['p99_ms'] / reference['p99_ms']:4.2f}x)  services {cpu:5.1f} ms CPU/payment"
        f" + database server {db:4.1f} ms  errors {r['errors']}"
    )


async def _run(deployments: list[Deployment], seconds: float, rounds: int) -> None:
    for d in deployments:
        assert d.mesh is not None
        merchants = await onboard(d.mesh, MERCHANTS)
        d.workload = ColdWorkload(merchants)
        d.gateway = Gateway(d.mesh, merchants, members=_public_members(d))
        for index in range(len(merchants)):  # warm-up: every merchant's connection
            await d.gateway.create(d.workload.next(index))
    rng = random.Random(5)
    try:
        for _ in range(rounds):
            for d in rng.sample(deployments, len(deployments)):
                assert d.mesh is not None and d.gateway is not None and d.workload is not None
                before = database_cpu_s(d.cluster)
                await measured_level(
                    d.gateway, d.workload, CONCURRENCY, seconds, member_pids(d.mesh), d.samples
                )
                d.database_cpu_s += database_cpu_s(d.cluster) - before
    finally:
        for d in deployments:
            if d.gateway is not None:
                await d.gateway.close()


def main(seconds: float, rounds: int) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    print(
        f"deployments side by side on {os.cpu_count()} cores (load average "
        f"{load_at_start[0]:.2f}): {rounds} alternating rounds of {seconds:g} s each at "
        f"concurrency {CONCURRENCY}, cache-cold workload over {MERCHANTS} merchants",
        flush=True,
    )
    deployments = [
        Deployment(REFERENCE, "sqlite", 1),
        Deployment("postgresql, 1 gateway", "postgresql", 1),
        Deployment("postgresql, 2 gateways", "postgresql", 2),
    ]
    with contextlib.ExitStack() as stack:
        for d in deployments:
            var_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="paymesh-dep-")))
            stack.enter_context(started(d, var_dir))
        asyncio.run(_run(deployments, seconds, rounds))
    results = {d.label: _summary(d) for d in deployments}
    reference = results[REFERENCE]
    for label, r in results.items():
        print(_line(label, r, reference), flush=True)
    line = {
        "bench": "mesh_deployments",
        "cores": os.cpu_count(),
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
        "concurrency": CONCURRENCY,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "deployments": results,
        "ratios_to_reference": {
            label: {
                "rps": r["rps"] / reference["rps"],
                "p99": r["p99_ms"] / reference["p99_ms"],
                "services_cpu_per_payment": r["cpu_ms_per_payment"]["mesh_ms"]
                / reference["cpu_ms_per_payment"]["mesh_ms"],
            }
            for label, r in results.items()
        },
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per deployment")
    options = parser.parse_args()
    main(options.seconds, options.rounds)
