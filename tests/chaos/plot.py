"""The chaos timeline PNG: per second, payment success, p50/p99 latency, faulted edges' breakers,
webhooks created and delivered, and where the payouts' money is; the launcher's restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STATE_LEVEL = {"closed": 0.0, "half-open": 0.5, "open": 1.0}


def plot_timeline(report: dict[str, Any], faults: list[Any], path: Path) -> None:
    """Five stacked panels sharing the time axis, each fault's window shaded and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    t = [r["t"] for r in rows]
    fig, (ok_ax, lat_ax, br_ax, hook_ax, pay_ax) = plt.subplots(
        5,
        1,
        figsize=(15, 15),
        sharex=True,
        gridspec_kw={"height_ratios": [2, 1.6, 1.3, 1.3, 1.3]},
    )
    axes = (ok_ax, lat_ax, br_ax, hook_ax, pay_ax)
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
    br_ax.legend(loc="upper left", fontsize=7, ncol=2)

    _webhooks(hook_ax, report)
    _payouts(pay_ax, report)
    pay_ax.set_xlabel("seconds since the load started")

    for i, fault in enumerate(faults):
        start, healed = fault.times["start"], fault.times["healed"]
        for ax in axes:
            ax.axvspan(start, max(healed, start + 0.5), color="#ff7f0e", alpha=0.15)
        # Staggered: short faults close together would print their names over each other.
        ok_ax.text(start, 102 + 6 * (i % 2), fault.name, fontsize=8, va="bottom")
    ok_ax.set_ylim(-5, 118)
    for comeback in report["launcher"]["comebacks"]:
        killed, back = comeback["killed_at_s"], comeback["serving_after_s"]
        for ax in axes:
            ax.axvline(killed, color="#d62728", linestyle=":", linewidth=1)
        if back is not None:
            ok_ax.annotate(
                f"{comeback['name']} SERVING again\n{back:.1f} s after kill -9\n(the launcher)",
                xy=(killed + back, 50),
                xytext=(killed + back + 1, 35),
                fontsize=7,
                arrowprops={"arrowstyle": "->", "color": "#d62728"},
            )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _webhooks(ax: Any, report: dict[str, Any]) -> None:
    """Events created so far and delivered so far at the receiver; the gap is the backlog."""
    rows = report.get("webhook_timeline", [])
    t = [r["t"] for r in rows]
    ax.plot(t, [r["created"] for r in rows], color="#7f7f7f", label="webhook events created")
    ax.plot(
        t,
        [r["delivered"] for r in rows],
        color="#17becf",
        label="delivered (accepted by the receiver)",
    )
    ax.fill_between(
        t,
        [r["delivered"] for r in rows],
        [r["created"] for r in rows],
        color="#17becf",
        alpha=0.2,
        label="backlog",
    )
    hooks = report["webhooks"]
    ax.set_title(
        f"webhooks: {hooks['events']} events, {hooks['delivered']} delivered, "
        f"{hooks['duplicates_at_receiver']} duplicates at the receiver",
        fontsize=9,
        loc="left",
    )
    ax.set_ylabel("webhook events (cumulative)")
    ax.legend(loc="upper left", fontsize=7)


def _payouts(ax: Any, report: dict[str, Any]) -> None:
    """Where the settlements' money is, per ledger sample (EUR), and when each completed."""
    samples = report.get("ledger_samples", [])
    t = [s["t"] for s in samples]
    for kind, color in (
        ("settling", "#bcbd22"),
        ("payout_in_transit", "#ff7f0e"),
        ("bank_payouts", "#2ca02c"),
    ):
        ax.step(
            t,
            [s[kind] / 100 for s in samples],
            where="post",
            color=color,
            label=kind + (" (paid out, as the bank confirmed)" if kind == "bank_payouts" else ""),
        )
    runs = report["settlements"].get("runs", [])
    for run in runs:
        ax.plot(run["created_at_s"], 0, marker="v", color="#8c564b", markersize=6)
        if run["completed_at_s"] is not None:
            ax.plot(run["completed_at_s"], 0, marker="^", color="#2ca02c", markersize=6)
    unbalanced = [s["t"] for s in samples if any(v != 0 for v in s["net"].values())]
    settled = report["settlements"]
    ax.set_title(
        f"settlements: {settled['total']} made (v), {settled['completed']} completed (^); "
        f"ledger sampled {len(samples)} times, {len(unbalanced)} unbalanced",
        fontsize=9,
        loc="left",
    )
    ax.set_ylabel("EUR")
    ax.legend(loc="upper left", fontsize=7)
