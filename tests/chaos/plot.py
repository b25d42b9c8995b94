"""The chaos timeline PNG: per second, payment success, p50/p99 latency, faulted edges' breakers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATE_LEVEL = {"closed": 0.0, "half-open": 0.5, "open": 1.0}


def plot_timeline(report: dict[str, Any], faults: list[Any], path: Path) -> None:
    """Three stacked panels sharing the time axis, each fault's window shaded and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    t = [r["t"] for r in rows]
    fig, (ok_ax, lat_ax, br_ax) = plt.subplots(
        3, 1, figsize=(15, 9), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.3]}
    )
    fig.suptitle(
        f"make chaos: {report['load']['creates_per_s']:g} CreatePayment/s + "
        f"{report['load']['reads_per_s']:g} reads/s, breaker open_s "
        f"{report['policy']['breaker_open_s']:g} s - invariants "
        f"{'all PASS' if report['passed'] else 'FAILED'}",
        fontsize=12,
    )
    ok_ax.plot(
        t,
        [None if r["create_success"] is None else 100 * r["create_success"] for r in rows],
        color="#2ca02c",
        label="payments SUCCEEDED %",
    )
    ok_ax.plot(
        t,
        [None if r.get("create_answered") is None else 100 * r["create_answered"] for r in rows],
        color="#9467bd",
        alpha=0.6,
        linestyle="--",
        label="CreatePayment answered OK % (any payment status)",
    )
    ok_ax.plot(
        t,
        [None if r["read_success"] is None else 100 * r["read_success"] for r in rows],
        color="#1f77b4",
        alpha=0.6,
        label="reads OK %",
    )
    ok_ax.set_ylabel("success % (by start second)")
    ok_ax.set_ylim(-5, 105)
    ok_ax.legend(loc="lower left", fontsize=8)

    lat_ax.plot(t, [r["p50_ms"] for r in rows], color="#1f77b4", label="p50")
    lat_ax.plot(t, [r["p99_ms"] for r in rows], color="#d62728", label="p99")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("CreatePayment latency ms")
    lat_ax.legend(loc="upper left", fontsize=8)

    edges = sorted({(f.caller, f.target) for f in faults})
    samples = report["breaker_samples"]
    for i, (caller, target) in enumerate(edges):
        points = [
            (s["t"], STATE_LEVEL.get(s["states"].get(target, "closed"), 0.5) + i * 1.5)
            for s in samples
            if s["caller"] == caller
        ]
        if points:
            br_ax.step(
                [p[0] for p in points],
                [p[1] for p in points],
                where="post",
                label=f"{caller} -> {target}",
            )
    br_ax.set_yticks(
        [i * 1.5 + level for i in range(len(edges)) for level in (0, 1)],
        ["closed", "open"] * len(edges),
        fontsize=7,
    )
    br_ax.set_ylabel("breaker state")
    br_ax.set_xlabel("seconds since the load started")
    br_ax.legend(loc="upper left", fontsize=7, ncol=2)

    for fault in faults:
        start, healed = fault.times["start"], fault.times["healed"]
        for ax in (ok_ax, lat_ax, br_ax):
            ax.axvspan(start, max(healed, start + 0.5), color="#ff7f0e", alpha=0.15)
        ok_ax.text(start, 102, fault.name, fontsize=8, va="bottom")
    for ax in (ok_ax, lat_ax, br_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
