"""Benchmark of the breaker's failure accounting: cost of recording a failed call against how
many calls its failure-rate window holds, on a fake clock (no network, one process).

For each rate the window (the seed's 60 s) is filled at that rate, then failed and successful
calls alternate (a 100 % threshold keeps it closed). Prints per failed call the mean, p99 and
worst ``record``, the one call after an idle window, and the memory the window holds, then
one JSON line. ``python -m bench.breaker_accounting [--calls N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from interceptors.breaker import Outcome, TargetBreaker  # noqa: E402
from interceptors.policy import BreakerPolicy  # noqa: E402

RATES_PER_S = (1_000, 10_000)


class _Clock:
    """Fake time: the window fills in a moment instead of a minute."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _steady(rate_per_s: int, calls: int) -> dict[str, Any]:
    """Fill the window at ``rate_per_s``, then time ``calls`` failed calls at that rate."""
    policy = dataclasses.replace(
        BreakerPolicy(), failure_rate=1.0, consecutive_failures=1_000_000
    )  # the seed's window and minimum; thresholds it never reaches, so it stays closed
    clock = _Clock()
    breaker = TargetBreaker("bench", policy, clock=clock)
    step = 1.0 / rate_per_s
    gc.collect()
    tracemalloc.start()
    for i in range(int(policy.window_s * rate_per_s)):
        clock.now += step
        breaker.record(breaker.admit(), Outcome.FAILURE if i % 2 else Outcome.SUCCESS)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    samples: list[float] = []
    for _ in range(calls):
        clock.now += step
        breaker.record(breaker.admit(), Outcome.SUCCESS)
        clock.now += step
        permit = breaker.admit()
        began = time.perf_counter_ns()
        breaker.record(permit, Outcome.FAILURE)
        samples.append((time.perf_counter_ns() - began) / 1000)
    in_window = breaker.readout().window_calls
    clock.now += policy.window_s + 1  # idle: everything in the window has expired
    permit = breaker.admit()
    began = time.perf_counter_ns()
    breaker.record(permit, Outcome.FAILURE)
    after_idle = (time.perf_counter_ns() - began) / 1000
    samples.sort()
    return {
        "calls_per_s": rate_per_s,
        "window_s": policy.window_s,
        "calls_in_window": in_window,
        "mean_us": round(statistics.fmean(samples), 2),
        "p99_us": round(samples[int(len(samples) * 0.99)], 2),
        "max_us": round(samples[-1], 1),
        "after_idle_window_us": round(after_idle, 1),
        "window_memory_kb": round(held / 1024, 1),
    }


def main(calls: int) -> dict[str, Any]:
    """Measure each rate, print the rows and the JSON line."""
    rows = [_steady(rate, calls) for rate in RATES_PER_S]
    for row in rows:
        print(
            f"breaker failure accounting at {row['calls_per_s']:,} calls/s "
            f"({row['calls_in_window']:,} calls in the {row['window_s']:g} s window): "
            f"{row['mean_us']:.2f} us per failed call (p99 {row['p99_us']:.2f}, "
            f"worst {row['max_us']:.1f}), "
            f"after an idle window {row['after_idle_window_us']:.1f} us, "
            f"window holds {row['window_memory_kb']:,.1f} kB"
        )
    flat = rows[-1]["mean_us"] / rows[0]["mean_us"]
    print(f"mean per failed call, {RATES_PER_S[-1]:,} vs {RATES_PER_S[0]:,} calls/s: {flat:.2f}x")
    line = {
        "bench": "breaker_accounting",
        "rows": rows,
        "ratio_mean_fast_over_slow": round(flat, 2),
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed failed calls per rate")
    main(parser.parse_args().calls)
