"""risk-service's store schema: the velocity index's migration, on either engine."""

from __future__ import annotations

from collections.abc import Callable

from paymesh.common.v1 import common_pb2
from paymesh.risk.v1 import risk_pb2 as pb
from services.risk import store as risk_store
from services.risk.store import AssessmentStore
from services.storage.sql import Database, Target


def _request(request_id: str, merchant: str = "m_1") -> pb.AssessPaymentRequest:
    return pb.AssessPaymentRequest(
        request_id=request_id,
        merchant_id=merchant,
        payment_id=f"pay_{request_id}",
        amount=common_pb2.Money(amount_minor=1000, currency_code="USD"),
    )


def _indexes(db: Database) -> set[str]:
    if db.engine == "sqlite":
        rows = db.all(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", ["assessments"]
        )
    else:
        rows = db.all(
            "SELECT indexname AS name FROM pg_indexes"
            " WHERE schemaname = current_schema() AND tablename = ?",
            ["assessments"],
        )
    return {str(row["name"]) for row in rows}


def _velocity_plan(db: Database) -> str:
    params = ("USD", "m_1", 0)
    if db.engine == "sqlite":
        rows = db.all(f"EXPLAIN QUERY PLAN {risk_store.VELOCITY_QUERY}", params)
        return "\n".join(str(row["detail"]) for row in rows)
    # A table this small is cheaper to scan; the plan shows what the index can do.
    with db.transaction() as tx:
        tx.run("SET LOCAL enable_seqscan = off")
        rows = tx.all(f"EXPLAIN {risk_store.VELOCITY_QUERY}", params)
    return "\n".join(str(row[0]) for row in rows)


def test_a_database_of_migration_1_gets_the_velocity_index_and_keeps_its_rows(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("risk")
    older = Database(target, risk_store.TABLES)
    assert "assessments_by_merchant" in _indexes(older)
    older.close()
    before = AssessmentStore(target)  # applies migration 2
    made = before.assess(_request("r1"), None)
    before.close()
    # A fresh open of an already migrated database applies nothing more.
    again = Database(target, risk_store.SCHEMA)
    try:
        assert again.applied == []
        names = _indexes(again)
        assert "assessments_velocity" in names
        assert "assessments_by_merchant" not in names
        assert "assessments_velocity" in _velocity_plan(again)
        versions = again.all(
            "SELECT version FROM schema_migrations WHERE component = ? ORDER BY version",
            ["assessments"],
        )
        assert [int(row["version"]) for row in versions] == [1, 2]
    finally:
        again.close()
    store = AssessmentStore(target)
    try:
        assert store.get(made.assessment_id) == made
        assert store.summary("m_1").assessment_count == 1
    finally:
        store.close()


def test_opening_a_database_of_migration_1_applies_migration_2_alone(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("risk")
    Database(target, risk_store.TABLES).close()
    db = Database(target, risk_store.SCHEMA)
    try:
        assert db.applied == ["assessments 2"]
    finally:
        db.close()


def test_the_velocity_query_reads_the_covering_index_alone(
    database_target: Callable[[str], Target],
) -> None:
    target = database_target("risk")
    store = AssessmentStore(target)
    for index in range(5):
        store.assess(_request(f"r{index}"), None)
    store.assess(_request("other", merchant="m_2"), None)
    store.close()
    db = Database(target, risk_store.SCHEMA)
    try:
        plan = _velocity_plan(db)
        if db.engine == "sqlite":
            assert "USING COVERING INDEX assessments_velocity" in plan
        else:
            assert "Index Only Scan using assessments_velocity" in plan
        assert "SCAN assessments\n" not in plan + "\n"
    finally:
        db.close()
