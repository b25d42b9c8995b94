"""One claim+charge transaction on each store engine, side by side in one run.

The transaction is what channel-adapter's Charge writes: claim the request id, insert the
charge, record the reply, commit (``Database.idempotent``), on a SQLite file and on a local
PostgreSQL cluster (``services/tools/postgres.py``, fsync off as in the tests; a real server's
fsync adds its disk's flush). ``python -m bench.store_engines``; prints µs per transaction
and one JSON line. Never pass/fail on speed.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from paymesh.order.v1 import order_pb2
from services.storage.sql import Database, Statements, Target
from services.tools import postgres

CHARGES = """
CREATE TABLE IF NOT EXISTS charges (
    charge_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    amount_minor INTEGER NOT NULL,
    create_time_ns INTEGER NOT NULL
);
"""
ROUNDS = 5
PER_ROUND = 400


def _per_transaction_us(target: Target) -> float:
    """Median over rounds of the mean µs of one claim+charge transaction."""
    db = Database(target, CHARGES)
    response = order_pb2.UpdateOrderStatusResponse
    rounds: list[float] = []
    try:
        for round_index in range(ROUNDS + 1):  # the first round warms up (prepared statements)
            start = time.perf_counter()
            for i in range(PER_ROUND):
                key = f"r_{round_index}_{i}"

                def charge(tx: Statements, key: str = key) -> order_pb2.UpdateOrderStatusResponse:
                    tx.insert(
                        "charges",
                        {
                            "charge_id": f"ch_{key}",
                            "request_id": key,
                            "amount_minor": 2500,
                            "create_time_ns": time.time_ns(),
                        },
                    )
                    return response(order=order_pb2.Order(order_id=key))

                request = order_pb2.UpdateOrderStatusRequest(request_id=key, order_id=key)
                db.idempotent("Charge", request, response, charge)
            if round_index:
                rounds.append((time.perf_counter() - start) / PER_ROUND * 1e6)
    finally:
        db.close()
    return statistics.median(rounds)


def main() -> None:
    """Measure both engines in this process, one after the other."""
    scratch = Path(tempfile.mkdtemp(prefix="paymesh-bench-"))
    figures: dict[str, float | None] = {}
    try:
        figures["sqlite_us"] = _per_transaction_us(scratch / "charges.db")
        cluster_dir = postgres.temporary_directory()
        try:
            cluster = postgres.LocalCluster(cluster_dir)
            cluster.start()
            try:
                url = cluster.create_database("bench")
                figures["postgresql_us"] = _per_transaction_us(f"{url}?schema=bench")
            finally:
                cluster.stop()
        except postgres.PostgresUnavailable as exc:
            print(f"PostgreSQL not measured: {exc}")
            figures["postgresql_us"] = None
        finally:
            shutil.rmtree(cluster_dir, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, value in figures.items():
        shown = "n/a" if value is None else f"{value:8.1f} µs"
        print(f"claim+charge transaction, {name.removesuffix('_us'):<10} {shown}")
    if figures["sqlite_us"] and figures["postgresql_us"]:
        print(f"PostgreSQL / SQLite: {figures['postgresql_us'] / figures['sqlite_us']:.1f}x")
    print(json.dumps({"store_engines": figures}))


if __name__ == "__main__":
    main()
