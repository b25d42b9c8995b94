"""``make chaos``: every fault of issues 7 and 15 against the mesh; exit 1 if an invariant fails.

``python -m tests.chaos [--out var/chaos] [--open-s 5] [--short]``. The mesh runs under its
real launcher
(``python -m services.tools.launcher``). Bounded: about four and a half minutes for the full
run (two faults with ``--short``: one), then it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from tests.chaos.run import SHORT, all_faults, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/chaos"), help="report directory")
    parser.add_argument(
        "--open-s", type=float, default=5.0, help="breaker open_s for the run (deployed: 30)"
    )
    parser.add_argument(
        "--window-s", type=float, default=10.0, help="breaker window_s for the run (deployed: 60)"
    )
    parser.add_argument(
        "--short", action="store_true", help=f"{' and '.join(SHORT)} only (what CI runs)"
    )
    options = parser.parse_args(argv)
    faults = all_faults()
    if options.short:
        faults = [f for f in faults if f.name in SHORT]
    report = asyncio.run(
        run(out_dir=options.out, faults=faults, open_s=options.open_s, window_s=options.window_s)
    )
    print(f"chaos: report {options.out / 'report.json'}, timeline {options.out / 'timeline.png'}")
    for line in summary(report):
        print(line)
    print("chaos: all invariants hold" if report["passed"] else "chaos: INVARIANT FAILED")
    return 0 if report["passed"] else 1


def summary(report: dict[str, Any]) -> list[str]:
    """The figures of a report, a line each."""
    policy, load = report["policy"], report["load"]
    lines = [
        f"  timings for the run: breaker open {policy['breaker_open_s']:g} s, window "
        f"{policy['breaker_window_s']:g} s; "
        + ", ".join(f"{k}={v}" for k, v in policy["environment"].items()),
        f"  load: {load['payments']} payments ({load['succeeded']} SUCCEEDED, acknowledged), "
        f"{load['client_attempts']} client calls; {load['transient_unavailable_retried']} "
        "UNAVAILABLE answers with RetryInfo retried with the same request_id ("
        f"{load['transient_unavailable_retried'] - load['transient_unavailable_kept_pending']} "
        f"left the key free, {load['transient_unavailable_kept_pending']} kept the payment "
        "PENDING)",
    ]
    for fault in report["faults"]:
        ff = fault["fast_fail_ms_while_open"]
        opened = (
            "stayed closed"
            if fault["time_to_open_s"] is None
            else f"open after {fault['time_to_open_s']} s"
        )
        if ff["count"]:
            opened += f", fast-fail p50/p99 {ff['p50']}/{ff['p99']} ms"
        lines.append(
            f"  {fault['name']:24} {opened}, success during "
            f"{_pct(fault['success_rate_during'])} after {_pct(fault['success_rate_after'])}, "
            f"full success {fault['recovered_after_s']} s after the end"
        )
    launcher = report["launcher"]
    for comeback in launcher["comebacks"]:
        lines.append(
            f"  launcher: {comeback['name']} killed at {comeback['killed_at_s']} s, restarted "
            f"(restart {comeback['restarts_after']}) after {comeback['restarted_after_s']} s, "
            f"SERVING after {comeback['serving_after_s']} s"
        )
    lines.append(
        f"  launcher: restarts {launcher['restarts'] or 'none'}, exit code {launcher['exit_code']}"
    )
    hooks = report["webhooks"]
    line = (
        f"  webhooks: {hooks['events']} events, {hooks['delivered']} delivered, "
        f"{hooks['duplicates_at_receiver']} duplicates at the receiver"
    )
    outage = hooks.get("outage")
    if outage:
        line += (
            f"; outage backlog {outage['backlog']} events, delivered "
            f"{outage['first_delivery_after_heal_s']}-{outage['all_delivered_after_heal_s']} s "
            f"after the heal (median {outage['median_delivery_after_heal_s']} s)"
        )
    lines.append(line)
    settled = report["settlements"]
    if settled["total"]:
        after = settled["completed_after_heal_s"]
        lines.append(
            f"  settlements: {settled['total']} ({settled['by_phase']}), "
            f"{settled['completed']} completed, {settled['withdrawals_completed']} withdrawals "
            f"paid ({settled['paid_out_minor']} EUR minor); those of the bank outage completed "
            f"{min(after, default=0)}-{max(after, default=0)} s after it"
        )
    lines.append(
        f"  ledger: {len(report['ledger_samples'])} consistent samples "
        f"({report['ledger_samples_missed']} missed)"
    )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
