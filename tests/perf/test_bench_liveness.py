"""Liveness bookkeeping at scale: the re-queue scan (every housekeeping pass of every worker) and the
stall report (every /metrics scrape and dashboard view) must read only the active few, whatever the
history. Measured with 50 waiting items before and after a history of HISTORY finished attempts,
outbox rows and resolved exceptions (a million on PostgreSQL, 20k on SQLite), each figure beside a
bare `SELECT 1` round trip on the same connection pool, measured in the same run."""

from __future__ import annotations

import os
import statistics
import time

import sqlalchemy as sa

from app.db.models import Attempt, ExceptionItem, OutboxEntry
from app.db.session import transaction
from app.domain.liveness import HandoffPolicy
from app.services import intake
from app.services.liveness import handoff_report, unclaimed_work
from tests.factories import make_exception, medication_request, setup_connection
from tests.perf.conftest import report

ACTIVE = 50


def history_size(database_url: str) -> int:
    default = 1_000_000 if database_url.startswith("postgresql") else 20_000
    return int(os.environ.get("RECON_BENCH_HISTORY", default))


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def clone_rows(session, table: sa.Table, template_id: int, count: int, overrides: dict[str, str]) -> None:
    """INSERT … SELECT `count` copies of one row (new ids), with SQL overrides per column; `n` is the
    copy's number. Runs on SQLite and PostgreSQL alike (a recursive CTE as the series)."""
    columns = [c.name for c in table.columns if c.name != "id"]
    values = [overrides.get(c, f"t.{c}") for c in columns]
    session.execute(
        sa.text(
            f"WITH RECURSIVE series(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM series WHERE n < :count) "
            f"INSERT INTO {table.name} ({', '.join(columns)}) "
            f"SELECT {', '.join(values)} FROM {table.name} t CROSS JOIN series WHERE t.id = :template"
        ),
        {"count": count, "template": template_id},
    )


def test_requeue_scan_and_stall_report_stay_flat_over_history(sessions, users, database_url):
    setup_connection(sessions)
    policy = HandoffPolicy()
    template_exception = make_exception(sessions, users["svc"], key="history-template")
    with transaction(sessions) as s:  # the template's own delivery is history, not waiting work
        s.execute(sa.update(Attempt).values(outcome="rejected"))
        s.execute(sa.update(OutboxEntry).values(relayed_at=sa.func.current_timestamp()))
    # 50 waiting deliveries: accepted, relayed, unclaimed (no worker runs here).
    for n in range(ACTIVE):
        body = {
            "connection": "mercy-epic",
            "message_type": "MedicationRequest",
            "payload": medication_request(f"Patient/{n}"),
            "content_type": "application/fhir+json",
        }
        with transaction(sessions) as s:
            intake.submit_message(s, users["svc"], f"active-{n}", body)
    with transaction(sessions) as s:
        s.execute(sa.update(OutboxEntry).values(relayed_at=sa.func.current_timestamp()))

    def scan():
        assert len(unclaimed_work(sessions)) == ACTIVE

    def stall_report():
        with transaction(sessions, read_only=True) as s:
            assert handoff_report(s, policy).stages["queued_delivery"].waiting == ACTIVE

    def bare():
        with transaction(sessions, read_only=True) as s:
            s.execute(sa.text("SELECT 1")).scalar()

    before = {"scan": median_ms(scan, 30), "report": median_ms(stall_report, 30)}

    history = history_size(database_url)
    with transaction(sessions) as s:
        attempt_id = s.scalar(sa.select(sa.func.min(Attempt.id)))  # the template's: rejected
        outbox_id = s.scalar(sa.select(sa.func.min(OutboxEntry.id)))
        clone_rows(s, Attempt.__table__, attempt_id, history, {"outcome": "'delivered'"})
        clone_rows(
            s,
            OutboxEntry.__table__,
            outbox_id,
            history,
            {"ref_id": "CAST(n + 100000000 AS VARCHAR(64))", "job_id": "'deliver-history'"},
        )
        clone_rows(s, ExceptionItem.__table__, template_exception, history, {"state": "'resolved'"})
    if database_url.startswith("postgresql"):
        with sessions.kw["bind"].connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")

    after = {"scan": median_ms(scan, 30), "report": median_ms(stall_report, 30)}
    anchor = median_ms(bare, 200)
    db = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    ok = all(after[k] <= 2 * max(before[k], anchor) and after[k] <= 50 * anchor for k in after)
    report(
        "liveness_bookkeeping",
        {
            "database": db,
            "history_rows": history,
            "waiting": ACTIVE,
            "scan_ms": round(after["scan"], 2),
            "scan_ms_no_history": round(before["scan"], 2),
            "report_ms": round(after["report"], 2),
            "report_ms_no_history": round(before["report"], 2),
            "bare_select1_ms": round(anchor, 3),
            "scan_x_bare": round(after["scan"] / anchor, 1),
            "report_x_bare": round(after["report"] / anchor, 1),
        },
        "flat: with the history each ≤ 2× its cost without it, and ≤ 50 bare SELECT 1 round trips",
        ok,
    )
