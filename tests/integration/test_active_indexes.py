"""Issue 6, pages flat in the number of rows: on PostgreSQL, with a history large enough that the
planner cares (thousands of resolved rows, ANALYZEd), every queue query, SLA escalation, due
retries, the re-queue scan, the relay and the summary refresh read active rows through the partial
indexes of migration 0007 — never a sequential scan of exceptions — and queue pages come off the
index in order (no Sort)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.db.session import transaction
from app.services import delivery, liveness, queries, summaries
from app.services.clock import utcnow
from app.services.exceptions import escalate_breached
from tests.bulkdata import fill, setup_scopes

pytestmark = pytest.mark.postgres  # not collected without TEST_DATABASE_URL (tests/conftest.py)

TOTAL = 20_000
ACTIVE_INDEXES = (
    "ix_exceptions_queue",
    "ix_exceptions_active_due",
    "ix_exceptions_active_state",
    "ix_exceptions_active_category",
    "ix_exceptions_active_customer",
    "ix_exceptions_active_connection",
    "ix_exceptions_active_assignee",
)


@pytest.fixture
def history(sessions, users, is_postgres):
    if not is_postgres:
        pytest.skip(
            "EXPLAIN plans are checked on PostgreSQL (set TEST_DATABASE_URL); SQLite's planner "
            "is covered by tests/web/test_queues.py"
        )
    now = utcnow()
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        connection_ids = setup_scopes(conn, customers=4, connections_per_customer=2, now=now)
        fill(
            conn,
            total=TOTAL,
            resolved_fraction=0.82,
            client_id=users["svc"].id,
            assignee_ids=[users["rita"].id, users["ravi"].id],
            connection_ids=connection_ids,
            now=now,
        )
        # The relay's table: its history relayed, a few rows waiting.
        conn.execute(
            sa.text(
                "INSERT INTO outbox (kind, ref_id, job_id, created_at, relayed_at)"
                " SELECT 'deliver', n::text, 'deliver-' || n, :t, CASE WHEN n > 5995 THEN NULL ELSE :t END"
                " FROM generate_series(1, 6000) n"
            ),
            {"t": now},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    return now


def statements(sessions, run) -> list[tuple[str, dict]]:
    """The SELECTs on exceptions, attempts or outbox that `run()` sends, with their parameters."""
    engine = sessions.kw["bind"]
    seen = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        head = statement.lstrip().upper()
        if head.startswith(("SELECT", "WITH")) and any(
            f"FROM {t}" in statement for t in ("exceptions", "attempts", "outbox")
        ):
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        run()
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    return seen


def plan(sessions, statement: str, parameters) -> str:
    with sessions.kw["bind"].connect() as conn:
        return "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))


def assert_reads_active_only(text: str, *, indexes=ACTIVE_INDEXES) -> None:
    assert "Seq Scan on exceptions" not in text, text
    assert any(name in text for name in indexes), text


def page_plan(sessions, queue: str, **filters) -> str:
    def run():
        with transaction(sessions, read_only=True) as s:
            queries.list_exceptions(s, **{"state": queries.queue_states(queue, None), **filters})

    [(statement, parameters)] = [
        (st, p) for st, p in statements(sessions, run) if "ORDER BY exceptions.sla_due_at" in st
    ]
    return plan(sessions, statement, parameters)


PAGES = [
    ("all", {}, "ix_exceptions_active_due"),
    ("escalated", {}, "ix_exceptions_active_state"),
    ("awaiting_approval", {}, "ix_exceptions_active_state"),
    # A category queue holds every active state of its category (issue 8); a state filter on it
    # is one range of the (state, category) index.
    ("ehr_rejected", {"category": "ehr_rejected"}, "ix_exceptions_active_category"),
    ("ehr_rejected", {"category": "ehr_rejected", "state": "open"}, "ix_exceptions_queue"),
    ("all", {"customer": "bulk-customer-01"}, "ix_exceptions_active_customer"),
    ("all", {"connection": "bulk-02-1"}, "ix_exceptions_active_connection"),
    ("all", {"category": "code_set"}, "ix_exceptions_active_category"),
    ("all", {"assignee": "rita"}, "ix_exceptions_active_assignee"),
    ("all", {"sla_status": "breached"}, "ix_exceptions_active_due"),
]


def test_queue_pages_are_an_ordered_range_of_a_partial_index(sessions, history):
    # One history for all the pages (filling it is the slow part).
    for queue, filters, index in PAGES:
        text = page_plan(sessions, queue, **filters)
        assert_reads_active_only(text, indexes=(index,))
        assert "Sort" not in text, (queue, filters, text)  # read in (sla_due_at, id) order, off the index


def test_a_later_page_starts_at_the_cursor_inside_the_index(sessions, history):
    with transaction(sessions, read_only=True) as s:
        _, cursor = queries.list_exceptions(s, state=queries.ACTIVE_STATES, limit=50)
    text = page_plan(sessions, "all", cursor=cursor)
    assert_reads_active_only(text, indexes=("ix_exceptions_active_due",))
    assert "Index Cond: (sla_due_at >=" in text, text
    assert "Sort" not in text, text


def test_free_text_search_starts_from_the_matching_messages(sessions, history):
    text = page_plan(sessions, "all", q="Patient/4242")
    assert "Seq Scan on exceptions" not in text, text


def test_sla_escalation_reads_open_items_past_due_from_the_state_index(sessions, history):
    def run():
        with transaction(sessions) as s:
            escalate_breached(s, limit=0)  # the scan alone: nothing escalated

    [(statement, parameters)] = statements(sessions, run)
    text = plan(sessions, statement, parameters)
    assert_reads_active_only(text, indexes=("ix_exceptions_active_state",))
    assert "Sort" not in text, text


def test_due_retries_and_their_stall_signal_read_the_retry_index(sessions, history, runtime):
    def run():
        with transaction(sessions) as s:
            # the due-retry scan as the worker sends it, without claiming anything
            s.execute(sa.text("SET LOCAL statement_timeout = 5000"))
        delivery.schedule_due_retries(runtime, limit=0)
        with transaction(sessions, read_only=True) as s:
            liveness.handoff_report(s, runtime.policy, utcnow())

    texts = [plan(sessions, st, p) for st, p in statements(sessions, run) if "next_retry_at" in st]
    assert len(texts) >= 2
    for text in texts:
        assert "Seq Scan on exceptions" not in text, text
        assert "ix_exceptions_retry_due" in text, text


def test_the_requeue_scan_and_the_relay_read_only_unclaimed_rows(sessions, history, runtime):
    def run():
        liveness.unclaimed_work(sessions)
        delivery.pending_outbox(runtime)

    texts = [plan(sessions, st, p) for st, p in statements(sessions, run)]
    queued = [t for t in texts if "attempts" in t]
    relay = [t for t in texts if "on outbox" in t]
    assert queued and all("ix_attempts_queued" in t for t in queued), queued
    assert relay and all("ix_outbox_relayed_at" in t and "Seq Scan" not in t for t in relay), relay


def test_the_summary_refresh_reads_active_rows_and_the_day_window_only(sessions, history):
    def run():
        summaries.refresh(sessions, force_trends=True)

    texts = [plan(sessions, st, p) for st, p in statements(sessions, run)]
    on_exceptions = [t for t in texts if "on exceptions" in t]
    assert len(on_exceptions) == 2, texts  # the counts, the hourly series
    for text in on_exceptions:
        assert "Seq Scan on exceptions" not in text, text
    assert any("ix_exceptions_resolved_at" in t for t in on_exceptions), on_exceptions
    window = [t for t in texts if "on attempts" in t]
    assert window and all("ix_attempts_started" in t for t in window), window


def test_pages_read_counts_from_the_summary_not_the_table(sessions, history):
    summaries.refresh(sessions)

    def run():
        with transaction(sessions, read_only=True) as s:
            queries.queue_counts(s)
            queries.queue_page(s, "all", filters={"customer": "bulk-customer-01"})
            queries.dashboard(s)

    texts = [plan(sessions, st, p) for st, p in statements(sessions, run)]
    assert texts
    for text in texts:
        assert "Seq Scan on exceptions" not in text and "Seq Scan on attempts" not in text, text
    # the only reads of exceptions are the two pages' rows
    assert sum("on exceptions" in t for t in texts) == 1, texts


def test_queue_counts_and_the_dashboard_read_the_stored_rollups(sessions, history):
    """Migration 0014: the summary's groups grow with connections × categories × states (thousands
    at a million rows), so the sidebar counts and the dashboard read the refresh's rollups (one row)
    and aggregate nothing per view; only a filtered total sums its few groups."""
    summaries.refresh(sessions)
    engine = sessions.kw["bind"]
    seen: list[str] = []

    def capture(_conn, _cursor, statement, _parameters, _context, _many):
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        with transaction(sessions, read_only=True) as s:
            queries.queue_counts(s)
            queries.dashboard(s)
            assert queries.queue_page(s, "ehr_rejected", filters={"state": None}).total > 0
            queries.queue_page(s, "all", filters={"customer": "bulk-customer-01"})
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert any("read_summaries.rollups" in st for st in seen), seen
    on_counts = [st for st in seen if "exception_counts" in st]
    # only the customer-filtered page's total; a queue's own total is the sidebar's
    assert len(on_counts) == 1 and "GROUP BY" not in on_counts[0], on_counts
    assert not any("GROUP BY" in st and "FROM exceptions" in st for st in seen), seen


def test_the_active_predicate_matches_the_domain():
    from app.db.active import ACTIVE_SQL, ACTIVE_STATES
    from app.domain.states import FINAL_STATES, ExceptionState

    assert tuple(s.value for s in ExceptionState if s not in FINAL_STATES) == ACTIVE_STATES
    assert "state IN (" + ", ".join(f"'{s}'" for s in ACTIVE_STATES) + ")" == ACTIVE_SQL
    # The migration froze the same text, and seeded a schedule row for every shared step.
    import importlib.util
    from pathlib import Path

    from app.adapters.queue import SHARED_STEPS

    path = Path(__file__).resolve().parents[2] / "migrations" / "versions" / "0007_active_indexes.py"
    spec = importlib.util.spec_from_file_location("migration_0007", path)
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.ACTIVE == ACTIVE_SQL
    assert set(migration.TASKS) == set(SHARED_STEPS)


def test_bulk_history_is_what_it_claims(sessions, history):
    with transaction(sessions, read_only=True) as s:
        total = s.scalar(sa.text("SELECT count(*) FROM exceptions"))
        active = s.scalar(
            sa.text(
                "SELECT count(*) FROM exceptions WHERE " + "state IN ('open', 'retrying', "
                "'escalated', 'pending_approval', 'replaying')"
            )
        )
        recent = s.scalar(
            sa.text("SELECT count(*) FROM exceptions WHERE created_at > :t"),
            {"t": history - timedelta(hours=9)},
        )
    assert total == TOTAL
    assert 0.12 * total < active < 0.24 * total
    assert recent >= active


def test_the_live_change_check_and_the_closed_match_hint_stay_off_the_history(sessions, history):
    """Issue 8 (one history for both): pages poll /queues/changes every few seconds, so the change
    check reads max(id) and max(updated_at) off their indexes, then one short updated_at range; and
    a search's "3 closed items match — show them" counts its few candidates, not the history."""

    def poll():
        with transaction(sessions, read_only=True) as s:
            queries.change_token(s)

    texts = [plan(sessions, st, p) for st, p in statements(sessions, poll)]
    assert len(texts) == 2, texts
    for text in texts:
        assert "Seq Scan on exceptions" not in text, text
        assert "ix_exceptions_updated_at" in text, text

    def search():
        with transaction(sessions, read_only=True) as s:
            queries.queue_page(s, "all", filters={"q": "Patient/4242"})

    sent = statements(sessions, search)
    assert any("'resolved'" in st for st, _ in sent), sent  # the closed matches were counted
    for st, p in sent:
        text = plan(sessions, st, p)
        assert "Seq Scan on exceptions" not in text, text
