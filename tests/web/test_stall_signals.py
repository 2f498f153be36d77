"""Issue 9, visible age: work that waits at a hand-off longer than the bound is an operational
signal — counted with its oldest age in /metrics and flagged on the dashboard."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.db.models import Attempt, ExceptionItem, Message, User
from app.db.session import transaction
from app.domain.delivery import Category
from app.domain.liveness import HandoffPolicy
from app.domain.states import ExceptionState
from app.services import intake
from app.services.exceptions import DecisionInput, decide, open_exception
from app.services.liveness import handoff_report
from tests.conftest import PASSWORD
from tests.factories import make_exception, medication_request


def accept(sessions, users, key: str) -> str:
    """A message accepted by intake and not yet claimed by any worker (none is running)."""
    body = {
        "connection": "mercy-epic",
        "message_type": "MedicationRequest",
        "payload": medication_request(),
        "content_type": "application/fhir+json",
    }
    with transaction(sessions) as s:
        return intake.submit_message(s, users["svc"], key, body).body["id"]


def metric(body: str, name: str, stage: str) -> float:
    match = re.search(rf'^{name}{{stage="{stage}"}} ([0-9.]+)$', body, re.M)
    assert match, f"{name}{{stage={stage}}} missing"
    return float(match.group(1))


def test_unclaimed_delivery_older_than_the_bound_is_counted_and_flagged(
    app, login, sessions, users, connection
):
    bound = app.config["RECON_SETTINGS"].handoff_policy().bound_seconds
    with freeze_time("2026-03-01 10:00:00"):
        accept(sessions, users, "stall-1")
    with freeze_time("2026-03-01 10:00:30"):
        accept(sessions, users, "stall-2")
        fresh = login("audrey").get("/").get_data(as_text=True)
        body = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'data-kpi="stalled">0<' in fresh and 'id="stall-alert"' not in fresh
    assert metric(body, "recon_handoff_waiting", "queued_delivery") == 2
    assert metric(body, "recon_handoff_stalled", "queued_delivery") == 0

    later = "2026-03-01 10:02:00"  # 120 s after the first, 90 s after the second; bound 104 s
    assert 90 < bound < 120
    with freeze_time(later):
        html = login("audrey").get("/").get_data(as_text=True)
        body = app.test_client().get("/metrics").get_data(as_text=True)
    assert metric(body, "recon_handoff_waiting", "queued_delivery") == 2
    assert metric(body, "recon_handoff_stalled", "queued_delivery") == 1
    assert metric(body, "recon_handoff_oldest_age_seconds", "queued_delivery") == 120
    assert re.search(r"^recon_handoff_bound_seconds 104$", body, re.M)
    assert 'data-kpi="stalled">1<' in html
    assert 'id="stall-alert"' in html and "1 item waited longer than the hand-off bound (104 s)" in html


def test_report_covers_overdue_retries_approved_replays_and_unreaped_leases(sessions, users, connection):

    policy = HandoffPolicy(lease_seconds=10, housekeeping_seconds=1, margin_seconds=2)  # bound 14 s
    now = datetime(2026, 3, 1, 12, 0, 0)
    with freeze_time(now - timedelta(minutes=5)):
        retry_id = accept(sessions, users, "r-1")
        lease_id = accept(sessions, users, "l-1")
    with transaction(sessions) as s:
        # One message whose automatic retry fell due 60 s ago and was never scheduled...
        message = s.get(Message, retry_id)
        s.execute(sa.update(Attempt).where(Attempt.message_id == retry_id).values(outcome="transient"))
        open_exception(
            s,
            message,
            Category.TRANSPORT,
            "connection refused",
            state=ExceptionState.RETRYING,
            next_retry_at=now - timedelta(seconds=60),
            actor="system:worker",
        )
        # ... and one claimed attempt whose lease ran out 30 s ago, with no reaper running.
        s.execute(
            sa.update(Attempt)
            .where(Attempt.message_id == lease_id)
            .values(outcome="in_flight", lease_expires_at=now - timedelta(seconds=30))
        )
    # An approved replay no worker has picked up for 40 s.
    replay_exc = make_exception(sessions, users["svc"], key="p-1")
    with freeze_time(now - timedelta(seconds=40)), transaction(sessions) as s:
        decide(s, replay_exc, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="fixed"))
        decide(
            s,
            replay_exc,
            s.get(User, users["lena"].id),
            DecisionInput("approve", reason="ok", password=PASSWORD),
        )
    with transaction(sessions) as s:  # its first delivery attempt is not part of this picture
        s.execute(sa.update(Attempt).where(Attempt.outcome == "queued").values(outcome="rejected"))
    with transaction(sessions, read_only=True) as s:
        report = handoff_report(s, policy, now)
    assert report.stages["replaying"].waiting == 1 and report.stages["replaying"].stalled == 1
    assert report.stages["replaying"].oldest_seconds == 40
    assert report.stages["retrying"].waiting == 1 and report.stages["retrying"].stalled == 1
    assert report.stages["retrying"].oldest_seconds == 60
    assert report.stages["lease_expired"].stalled == 1
    assert report.stages["queued_delivery"].waiting == 0
    assert report.stalled == 3
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(ExceptionItem)) == 2


def test_a_replay_deferred_for_an_open_window_is_not_stalled_until_the_window_plus_bound(
    sessions, users, connection
):
    from app.db.models import Replay

    policy = HandoffPolicy(lease_seconds=10, housekeeping_seconds=1, margin_seconds=2)  # bound 14 s
    now = datetime(2026, 3, 1, 12, 0, 0)
    exc_id = make_exception(sessions, users["svc"], key="d-1")
    with freeze_time(now - timedelta(seconds=60)), transaction(sessions) as s:
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="fixed"))
        decide(
            s, exc_id, s.get(User, users["lena"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    with transaction(sessions) as s:  # approved 60 s ago, deferred until 5 s ago
        s.execute(sa.update(Replay).values(not_before=now - timedelta(seconds=5)))
    with transaction(sessions, read_only=True) as s:
        replaying = handoff_report(s, policy, now).stages["replaying"]
    assert (replaying.waiting, replaying.oldest_seconds, replaying.stalled) == (1, 5, 0)
    with transaction(sessions, read_only=True) as s:
        later = handoff_report(s, policy, now + timedelta(seconds=10)).stages["replaying"]
    assert later.stalled == 1  # 15 s past its window: longer than the 14 s bound
