"""The short chaos run CI executes: kill -9 order-service under the real launcher, then a
partner answering 503s.

The whole mesh as
``python -m services.tools.launcher`` under steady merchant load (``tests/chaos/run.py``):
the killed member must come back by the launcher's hand, and every money, webhook and ledger
invariant and each fault's breaker and recovery check must pass. No speed is asserted: the
recovery limit is the breaker's open time plus slack, a property of the policy, and the
comeback bound is the launcher's restart delay plus a process start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.run import SHORT, all_faults, run


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_money_invariants_hold_through_a_crash_and_a_failing_partner(tmp_path: Path) -> None:
    faults = [f for f in all_faults() if f.name in SHORT]
    report = await run(out_dir=tmp_path, faults=faults, open_s=5.0, recovery_window_s=13.0)
    failed = [i for i in report["invariants"] if not i["passed"]]
    assert not failed, "\n".join(f"{i['name']}: {i['detail']}" for i in failed)
    assert [c["name"] for c in report["launcher"]["comebacks"]] == ["order-service"]
    assert (tmp_path / "report.json").is_file()
