"""``make bench``: every benchmark in one run, each in its own processes, figures as ratios.

1. chain overhead (bare stub vs the chain as a service builds it, spans exported or not),
2. open-breaker rejection through the stub
(both from ``bench.chain_overhead``), 2b. mTLS vs plaintext on a warm channel
(``bench.tls_overhead``), 2c. the production server side of one hop (policy, gate, metrics,
access log, trace context) vs a bare grpc.aio server on mTLS (``bench.server_hop``),
3. outage of one hop for the old BreakerClient, gRPC's own retries (careful and not) and the
chain, and their cost on a healthy target (``bench.outage``), 4. mesh throughput: cache-cold
CreatePayment, CPU per payment per service, RSS per service (``bench.mesh_throughput``), 5. the
breaker's failure accounting at 1 000 and 10 000 calls/s (``bench.breaker_accounting``), 6. one
claim+charge transaction on SQLite vs PostgreSQL (``bench.store_engines``), 7. CreatePayment on
SQLite vs PostgreSQL and one vs two gateway replicas, side by side (``bench.mesh_deployments``).
Each prints its figures and ends with one JSON line; this collects them, with the machine, load
average and git revision, into
``bench/results/latest.json`` and draws ``bench/results/latest.png``. Never pass/fail on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _run(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module``, echo its output, return its last JSON line."""
    print(f"\n== {module} {' '.join(args)}", flush=True)
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    last: dict[str, Any] | None = None
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            last = json.loads(line)
    if process.wait() != 0 or last is None:
        raise SystemExit(f"bench: {module} failed (exit {process.returncode})")
    return last


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def _revision() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it (then the figures are
    of uncommitted code)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def main(quick: bool) -> int:
    started = time.monotonic()
    load_at_start = os.getloadavg()
    revision = _revision()
    overhead = _run("bench.chain_overhead", "--calls", "1000" if quick else "4000")
    rejection = {
        "bench": "open_breaker_rejection",
        "median_us": overhead["open_breaker"]["median_us"],
        "p99_us": overhead["open_breaker"]["p99_us"],
        "goal_median_us": 50,
    }
    print(
        f"open-breaker rejection through the stub: median {rejection['median_us']:.1f} us, "
        f"p99 {rejection['p99_us']:.1f} us (goal median <= 50 us)"
    )
    print(json.dumps(rejection), flush=True)
    transport = _run("bench.tls_overhead", "--calls", "1000" if quick else "4000")
    server_hop = _run("bench.server_hop", "--calls", "4000" if quick else "16000")
    outage = _run("bench.outage", *(["--duration", "4"] if quick else []))
    throughput = _run("bench.mesh_throughput", "--seconds", "3" if quick else "8")
    accounting = _run(
        "bench.breaker_accounting",
        *(["--calls", "5000", "--repeats", "1"] if quick else ["--calls", "20000"]),
    )
    engines = _run("bench.store_engines")
    deployments = _run(
        "bench.mesh_deployments", *(["--seconds", "2", "--rounds", "1"] if quick else [])
    )
    results: dict[str, Any] = {
        "machine": _machine(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": revision,
        # The machine is shared: a run under a high load average is not comparable to one
        # under a low one (ratios measured side by side in one run still are).
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "wall_s": round(time.monotonic() - started, 1),
        "chain_overhead": overhead,
        "open_breaker_rejection": rejection,
        "tls_overhead": transport,
        "server_hop": server_hop,
        "outage": outage,
        "mesh_throughput": throughput,
        "breaker_accounting": accounting,
        "store_engines": engines,
        "mesh_deployments": deployments,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    from bench.plot import plot_results

    plot_results(results, RESULTS / "latest.png")
    print(f"\nresults: {RESULTS / 'latest.json'}, plot: {RESULTS / 'latest.png'}")
    summary = {
        "bench": "summary",
        "cores": results["machine"]["cores"],
        "chain_overhead_ratio_median": overhead["ratio_median"],
        "chain_overhead_paired_ratio_median": overhead["paired_ratio_median"],
        "chain_overhead_ratio_p99": overhead["ratio_p99"],
        "open_breaker_median_us": rejection["median_us"],
        "mtls_over_plaintext_ratio_median": transport["ratio_median"],
        "server_hop_over_bare_ratio_median": server_hop["production"]["ratio_median"],
        "server_hop_over_bare_ratio_server_cpu": server_hop["production"]["ratio_server_cpu"],
        "outage_p99_s": {
            mode: {c: r["p99_s"] for c, r in per.items()} for mode, per in outage["results"].items()
        },
        "create_payment_rps": {c: r["rps"] for c, r in throughput["create_payment"].items()},
        "create_payment_mesh_cpu_ms": {
            c: r["cpu_ms_per_payment"]["mesh_ms"] for c, r in throughput["create_payment"].items()
        },
        "create_payment_goal": throughput["goal"],
        "service_rss_max_growth": throughput["memory"]["max_service_growth"],
        "healthy_retry_cost_ratio_median": {
            c: r["ratio_median"] for c, r in outage["healthy_cost"].items()
        },
        "git": revision,
        "load_average": results["load_average"],
        "echo_one_hop_rps": throughput["echo_one_hop"]["64"]["rps"],
        "breaker_failed_call_us": {r["calls_per_s"]: r["mean_us"] for r in accounting["rows"]},
        "deployments_ratio_to_sqlite_one_gateway": deployments["ratios_to_reference"],
        "wall_s": results["wall_s"],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke check")
    sys.exit(main(parser.parse_args().quick))
