"""Issue 6: the audit page shows sealed events only and says when recorded events are waiting to
be sealed; the web app seals what a dead process left behind (its backstop)."""

from __future__ import annotations

import re
import time

import sqlalchemy as sa

from app.db.models import AuditPending
from app.db.session import get_engine, transaction
from app.services import audit


def _leave_pending(database_url: str) -> None:
    """An event committed by a process that died before sealing it."""
    with get_engine(database_url).begin() as conn:
        conn.execute(
            sa.insert(AuditPending.__table__).values(
                occurred_at=sa.func.current_timestamp(),
                actor="rita",
                action="decision.comment",
                subject_type="exception",
                subject_id="77",
                reason="left behind",
                details={},
            )
        )


def test_the_audit_page_notes_unsealed_events_and_a_request_seals_them(
    login, database_url, sessions, monkeypatch
):
    client = login("audrey")
    _leave_pending(database_url)
    monkeypatch.setattr(audit, "_backstop_last", time.monotonic())  # the backstop is not due
    html = client.get("/audit").get_data(as_text=True)
    assert re.search(r'data-pending="1"', html) and "not sealed into the chain yet" in html
    assert "left behind" not in html  # sealed events only

    monkeypatch.setattr(audit, "_backstop_last", 0.0)  # due: this request's teardown seals
    client.get("/audit")
    with transaction(sessions, read_only=True) as s:
        assert audit.pending_summary(s).count == 0
        assert audit.verify(s).ok
    html = client.get("/audit").get_data(as_text=True)
    assert "left behind" in html and 'data-pending="' not in html


def test_the_backstop_looks_at_most_once_per_interval(sessions, database_url, monkeypatch):
    monkeypatch.setattr(audit, "_backstop_last", 0.0)
    _leave_pending(database_url)
    assert audit.seal_if_due(sessions, every=60) == 1
    _leave_pending(database_url)
    assert audit.seal_if_due(sessions, every=60) == 0  # not due yet
    with transaction(sessions, read_only=True) as s:
        assert audit.pending_summary(s).count == 1
