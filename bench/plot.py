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
    """One figure, nine panels: overhead, rejection, outage p99/attempts/duplicates, throughput,
    CPU per payment per service, RSS per service, retry cost on a healthy target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 13))
    machine = results["machine"]
    git = results.get("git", {})
    load = results.get("load_average", {})
    fig.suptitle(
        f"PayMesh bench, {results['at']}, {machine['cores']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, {str(git.get('commit') or '?')[:10]}"
        f"{' (dirty)' if git.get('dirty') else ''}, load average "
        f"{load.get('start', [0])[0]:.1f} -> {load.get('end', [0])[0]:.1f}",
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
    ax.set_title(
        f"1. chain overhead: median ratio {overhead['ratio_median']:.2f}, round by round "
        f"{overhead['paired_ratio_median']:.2f} (goal ≤ 1.05)"
    )
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
        f"4. CreatePayment, cache-cold (echo ceiling of one hop: "
        f"{throughput['echo_one_hop']['64']['rps']:.0f} rps)"
    )
    _plot_mesh_cpu(axes[2][0], throughput)
    _plot_memory(axes[2][1], throughput["memory"])
    _plot_retry_cost(axes[2][2], outage["healthy_cost"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_mesh_cpu(ax: Any, throughput: dict[str, Any]) -> None:
    """CPU ms per payment of each service at the goal level, cold beside warm."""
    goal = str(throughput["goal"]["concurrency"])
    cold = throughput["create_payment"][goal]["cpu_ms_per_payment"]
    warm = throughput["create_payment_warm"][goal]["cpu_ms_per_payment"]
    names = sorted(cold["services_ms"], key=lambda n: cold["services_ms"][n])
    ys = range(len(names))
    ax.barh(
        [y + 0.2 for y in ys],
        [cold["services_ms"][n] for n in names],
        0.4,
        label=f"cache-cold: {cold['mesh_ms']:.1f} ms",
        color="#1f77b4",
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [warm["services_ms"][n] for n in names],
        0.4,
        label=f"cache-warm: {warm['mesh_ms']:.1f} ms",
        color="#7f7f7f",
    )
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.set_xlabel("CPU ms per payment")
    ax.set_title(f"5. CPU ms/payment per service, c={goal} (goal: sum <= 8)")
    ax.legend(fontsize=8)


def _plot_memory(ax: Any, memory: dict[str, Any]) -> None:
    """RSS per member idle, after run 1 and after run 2."""
    names = list(memory["idle_kib"])
    xs = range(len(names))
    for offset, key, label, colour in (
        (-0.27, "idle_kib", "idle", "#7f7f7f"),
        (0.0, "after_run1_kib", "after run 1", "#1f77b4"),
        (0.27, "after_run2_kib", "after run 2", "#d62728"),
    ):
        ax.bar(
            [x + offset for x in xs],
            [memory[key][n] / 1024 for n in names],
            0.27,
            label=label,
            color=colour,
        )
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("RSS MiB")
    ax.set_title(
        f"6. RSS: max growth run 1->2 {memory['max_service_growth']:+.1%} "
        f"(goal <= {memory['goal_max_growth']:.0%})"
    )
    ax.legend(fontsize=8, loc="lower right")


def _plot_retry_cost(ax: Any, cost: dict[str, Any]) -> None:
    """Median, p99 and client CPU of each retry layer against the bare stub, healthy target."""
    metrics = [("ratio_median", "median"), ("ratio_p99", "p99"), ("ratio_cpu", "client CPU")]
    clients = [c for c in cost if c != "bare"]
    width = 0.8 / len(clients)
    for i, client in enumerate(clients):
        ax.bar(
            [m + (i - (len(clients) - 1) / 2) * width for m in range(len(metrics))],
            [cost[client][key] for key, _ in metrics],
            width,
            label=CLIENT_LABELS.get(client, client),
            color=COLOURS.get(client, "#7f7f7f"),
        )
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="bare stub")
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylabel("x bare stub")
    ax.set_title("3b. retry layers on a healthy target (cost)")
    ax.legend(fontsize=8)
