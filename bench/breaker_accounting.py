"""Benchmark of the breaker's failure accounting: cost of recording a failed call against how
many calls its failure-rate window holds, on a fake clock (no network, one process).

For each rate a breaker's window (the seed's 60 s) is filled at that rate, then failed and
successful calls alternate (a 100 % threshold keeps it closed), the rates interleaved. Prints
per failed call the mean, median, p99 and worst ``record``, the call after an idle window and
the call that opens it (medians of ``--repeats``), and the memory the window holds, then one
JSON line. ``python -m bench.breaker_accounting [--calls N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from interceptors.breaker import Outcome, TargetBreaker  # noqa: E402
from interceptors.policy import BreakerPolicy  # noqa: E402

RATES_PER_S = (1_000, 10_000)
BATCH = 100


class _Clock:
    """Fake time: the window fills in a moment instead of a minute."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Stream:
    """One breaker fed at one rate, and the times its failed calls took to record."""

    rate_per_s: int
    breaker: TargetBreaker
    clock: _Clock
    window_memory_b: int
    samples_us: list[float] = field(default_factory=list)


def _fill(rate_per_s: int) -> _Stream:
    """A closed breaker whose window (the seed's 60 s) is full of calls at ``rate_per_s``."""
    policy = dataclasses.replace(
        BreakerPolicy(), failure_rate=1.0, consecutive_failures=2
    )  # the seed's window and minimum; calls alternate, so it stays closed until told
    clock = _Clock()
    stream = _Stream(rate_per_s, TargetBreaker("bench", policy, clock=clock), clock, 0)
    gc.collect()
    tracemalloc.start()
    _refill(stream)
    stream.window_memory_b, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return stream


def _refill(stream: _Stream) -> None:
    """One window's worth of calls at the stream's rate, every other one failed."""
    for i in range(int(stream.breaker.policy.window_s * stream.rate_per_s)):
        stream.clock.now += 1.0 / stream.rate_per_s
        stream.breaker.record(stream.breaker.admit(), Outcome.FAILURE if i % 2 else Outcome.SUCCESS)


def _failed_call_us(stream: _Stream) -> float:
    """Time recording one failed call at the stream's rate."""
    stream.clock.now += 1.0 / stream.rate_per_s
    permit = stream.breaker.admit()
    began = time.perf_counter_ns()
    stream.breaker.record(permit, Outcome.FAILURE)
    return (time.perf_counter_ns() - began) / 1000


def _measure(stream: _Stream, calls: int) -> None:
    """``calls`` failed calls, each after a successful one (so it stays below 100 %)."""
    for _ in range(calls):
        stream.clock.now += 1.0 / stream.rate_per_s
        stream.breaker.record(stream.breaker.admit(), Outcome.SUCCESS)
        stream.samples_us.append(_failed_call_us(stream))


def _row(stream: _Stream, repeats: int) -> dict[str, Any]:
    """The stream's figures, then the median call after an idle window (all of it expires)
    and the median call that opens the breaker, each on a full window."""
    policy = stream.breaker.policy
    in_window = stream.breaker.readout().window_calls
    idle_us, trip_us = [], []
    for _ in range(repeats):
        stream.breaker.record(stream.breaker.admit(), Outcome.SUCCESS)  # no failure run
        stream.clock.now += policy.window_s
        idle_us.append(_failed_call_us(stream))
        _refill(stream)
        stream.breaker.record(stream.breaker.admit(), Outcome.SUCCESS)
        _failed_call_us(stream)
        trip_us.append(_failed_call_us(stream))  # the second failure in a row opens it
        assert stream.breaker.state == "open", stream.breaker.state
        stream.clock.now += policy.open_s + 1
        for _ in range(policy.half_open_calls):  # trials that close it again
            stream.breaker.record(stream.breaker.admit(), Outcome.SUCCESS)
        _refill(stream)
    samples = sorted(stream.samples_us)
    return {
        "calls_per_s": stream.rate_per_s,
        "window_s": policy.window_s,
        "calls_in_window": in_window,
        "mean_us": round(statistics.fmean(samples), 2),
        "median_us": round(statistics.median(samples), 2),
        "p99_us": round(samples[int(len(samples) * 0.99)], 2),
        "max_us": round(samples[-1], 1),
        "after_idle_window_us": round(statistics.median(idle_us), 1),
        "tripping_call_us": round(statistics.median(trip_us), 1),
        "window_memory_kb": round(stream.window_memory_b / 1024, 1),
    }


def main(calls: int, repeats: int) -> dict[str, Any]:
    """Measure each rate, print the rows and the JSON line."""
    # Its trips log a warning each: the same text before and after, not accounting.
    logging.getLogger("paymesh.chain").setLevel(logging.ERROR)
    streams = [_fill(rate) for rate in RATES_PER_S]
    for _ in range(0, calls, BATCH):  # interleaved, so the machine's drift hits both alike
        for stream in streams:
            _measure(stream, BATCH)
    rows = [_row(stream, repeats) for stream in streams]
    for row in rows:
        print(
            f"breaker failure accounting at {row['calls_per_s']:,} calls/s "
            f"({row['calls_in_window']:,} calls in the {row['window_s']:g} s window): "
            f"{row['mean_us']:.2f} us per failed call (median {row['median_us']:.2f}, "
            f"p99 {row['p99_us']:.2f}, "
            f"worst {row['max_us']:.1f}), "
            f"after an idle window {row['after_idle_window_us']:.1f} us, "
            f"the call that opens it {row['tripping_call_us']:.1f} us, "
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
    parser.add_argument(
        "--repeats", type=int, default=3, help="idle windows and trips, each on a full window"
    )
    options = parser.parse_args()
    main(options.calls, options.repeats)
