"""``make chaos``: every fault of issue 7 against the running mesh; exit 1 if an invariant fails.

``python -m tests.chaos [--out var/chaos] [--open-s 5] [--short]``. Bounded: about four
minutes for the full run (two faults with ``--short``), then it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tests.chaos.run import all_faults, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/chaos"), help="report directory")
    parser.add_argument(
        "--open-s", type=float, default=5.0, help="breaker open_s for the run (deployed: 30)"
    )
    parser.add_argument(
        "--window-s", type=float, default=10.0, help="breaker window_s for the run (deployed: 60)"
    )
    parser.add_argument("--short", action="store_true", help="two faults only (what CI runs)")
    options = parser.parse_args(argv)
    faults = all_faults()
    if options.short:
        faults = [f for f in faults if f.name in ("order_service_kill9", "payment_channel_503")]
    report = asyncio.run(
        run(out_dir=options.out, faults=faults, open_s=options.open_s, window_s=options.window_s)
    )
    print(f"chaos: report {options.out / 'report.json'}, timeline {options.out / 'timeline.png'}")
    for fault in report["faults"]:
        ff = fault["fast_fail_ms_while_open"]
        print(
            f"  {fault['name']:24} open after {fault['time_to_open_s']} s, fast-fail p50/p99 "
            f"{ff['p50']}/{ff['p99']} ms, success during {_pct(fault['success_rate_during'])} "
            f"after {_pct(fault['success_rate_after'])}, full success "
            f"{fault['recovered_after_s']} s after the end"
        )
    print("chaos: all invariants hold" if report["passed"] else "chaos: INVARIANT FAILED")
    return 0 if report["passed"] else 1


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
