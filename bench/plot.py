"""Draws ``bench/results/latest.png`` from the collected results of ``python -m bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLIENT_LABELS = {
    "old_breaker_client": "old BreakerClient",
    "grpc_native_retry": "gRPC retryPolicy (seed numbers)",
    "grpc_native_sensible": "gRPC retryPolicy (careful)",
    "paymesh_chain": "PayMesh chain",
}
COLOURS = {
    "old_breaker_client": "#d62728",
    "grpc_native_retry": "#ff7f0e",
    "grpc_native_sensible": "#1f77b4",
    "paymesh_chain": "#2ca02c",
}


def plot_results(results: dict[str, Any], path: Path) -> None:
    """One figure, six panels: overhead, rejection, outage p99/attempts/duplicates, throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    machine = results["machine"]
    fig.suptitle(
        f"PayMesh bench, {results['at']}, {machine['cores']} cores ({machine['cpu']}), "
        f"Python {machine['python']}",
        fontsize=11,
    )

    overhead = results["chain_overhead"]
    ax = axes[0][0]
    labels = ["median", "p99"]
    bare = [overhead["bare"]["median_us"], overhead["bare"]["p99_us"]]
    chain = [overhead["chain"]["median_us"], overhead["chain"]["p99_us"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], bare, 0.4, label="bare stub", color="#7f7f7f")
    ax.bar([x + 0.2 for x in xs], chain, 0.4, label="full chain", color="#2ca02c")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("µs per call")
    ax.set_title(f"1. chain overhead: median ratio {overhead['ratio_median']:.2f} (goal ≤ 1.05)")
    ax.legend()

    rejection = results["open_breaker_rejection"]
    ax = axes[0][1]
    ax.bar(["median", "p99"], [rejection["median_us"], rejection["p99_us"]], color="#1f77b4")
    ax.axhline(50, color="k", linestyle="--", linewidth=1, label="goal: median ≤ 50 µs")
    ax.set_ylabel("µs per rejected call")
    ax.set_title("2. open-breaker rejection through the stub")
    ax.legend()

    outage = results["outage"]
    scale = outage["time_scale"]
    modes = list(outage["results"])
    clients = list(CLIENT_LABELS)
    width = 0.8 / len(clients)
    for ax, key, title in (
        (axes[0][2], "p99_s", "3. outage: p99 latency, unscaled s (log)"),
        (axes[1][0], "attempts_per_call", "3. outage: attempts sent per call"),
        (axes[1][1], "duplicate_side_effects", "3. outage: duplicate writes (non-idempotent)"),
    ):
        for i, client in enumerate(clients):
            values = [outage["results"][m][client][key] for m in modes]
            if key == "p99_s":
                values = [v / scale for v in values]
            ax.bar(
                [m + (i - (len(clients) - 1) / 2) * width for m in range(len(modes))],
                values,
                width,
                label=CLIENT_LABELS[client],
                color=COLOURS[client],
            )
        if key == "p99_s":
            ax.axhline(
                outage["caller_deadline_s"] / scale,
                color="k",
                linestyle="--",
                linewidth=1,
                label="caller deadline",
            )
            ax.set_yscale("log")
        ax.set_xticks(range(len(modes)), [f"target {m}" for m in modes])
        ax.set_title(title)
        ax.legend(fontsize=8)

    throughput = results["mesh_throughput"]
    ax = axes[1][2]
    levels = list(throughput["create_payment"])
    rps = [throughput["create_payment"][c]["rps"] for c in levels]
    p99 = [throughput["create_payment"][c]["p99_ms"] for c in levels]
    ax.plot(levels, rps, marker="o", color="#1f77b4", label="RPS")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("CreatePayment RPS", color="#1f77b4")
    twin = ax.twinx()
    twin.plot(levels, p99, marker="s", color="#d62728", label="p99 ms")
    twin.set_ylabel("p99 ms", color="#d62728")
    ax.set_title(
        f"4. CreatePayment end to end (echo ceiling of one hop: "
        f"{throughput['echo_one_hop']['64']['rps']:.0f} rps)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
