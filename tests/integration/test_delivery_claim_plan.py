"""A batch's claim of more queued attempts (app/services/delivery/batch.py, queued_of_connection)
reads each queued attempt's connection through its message's primary key: linear in the queued
attempts whatever the planner's statistics say — never every message of the connection per queued
attempt (a join on messages.connection_id did that before ANALYZE had seen a fresh backlog: ~75 ms
a claim at 500 queued, the bottleneck of four workers)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db.models import Attempt, User
from app.db.session import transaction
from app.services import connections, intake
from app.services.delivery.batch import queued_of_connection
from tests.samples import medication_request, message_body

pytestmark = pytest.mark.postgres  # not collected without TEST_DATABASE_URL (tests/conftest.py)

MESSAGES, DELIVERED = 900, 300  # two connections (2:1), the first 300 attempts history


def _plan(engine, statement) -> tuple[str, int]:
    sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as c:
        rows = c.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, FORMAT JSON) " + sql).scalar()
        c.rollback()  # EXPLAIN ANALYZE took the row locks
    plan = rows[0]["Plan"] if isinstance(rows, list) else rows
    return str(plan), plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0)


def test_claim_reads_messages_by_primary_key_with_or_without_statistics(sessions, users):
    with transaction(sessions) as s:
        connections.add_customer(s, "Mercy Health")
        ids = [
            connections.add_connection(
                s, name, customer="Mercy Health", protocol="fhir-r4", endpoint=f"http://127.0.0.1:9/{name}"
            ).id
            for name in ("mercy-epic", "mercy-two")
        ]
    with transaction(sessions) as s:
        client = s.get(User, users["svc"].id)
        for n in range(MESSAGES):
            name = "mercy-two" if n % 3 == 0 else "mercy-epic"
            intake.submit_message(s, client, f"plan-{n:04d}", message_body(name, medication_request(n)))
    engine = sessions.kw["bind"]
    with engine.begin() as c:
        first = c.scalar(sa.select(sa.func.min(Attempt.id)))
        c.execute(sa.update(Attempt).where(Attempt.id < first + DELIVERED).values(outcome="delivered"))
    queued = MESSAGES - DELIVERED
    for stats in ("no statistics", "analyzed"):
        if stats == "analyzed":
            with engine.begin() as c:
                c.exec_driver_sql("ANALYZE attempts")
                c.exec_driver_sql("ANALYZE messages")
        for connection_id in ids:
            plan, buffers = _plan(engine, queued_of_connection(connection_id, 19))
            assert "ix_messages_connection_id" not in plan, (stats, plan)
            assert "pk_messages" in plan, (stats, plan)
            # a PK lookup (~3 buffers) per queued attempt at most; the nested loop read ~30,000
            assert buffers <= 4 * queued + 200, (stats, buffers, plan)
