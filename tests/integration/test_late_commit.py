"""SPEC 2 under a late commit: an EHR that applies a request after our client gave up on it.

An identifier search made while the EHR is still working on the first request says "not there";
re-sending then would apply the order twice. A replay therefore waits until the earlier uncertain
request's own deadline (start + read timeout) plus a grace has passed before it reconciles. Found
by the chaos drill: a worker killed in the middle of a 30-second commit, the reaper's
unknown_outcome, an immediate resubmit and approval, a search that came too early."""

from __future__ import annotations

import time
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import Attempt, ExceptionItem, Replay, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body


def test_replay_after_a_late_commit_finds_the_order_instead_of_sending_it_again(
    client, users, sessions, sim_connection, sim_control, runtime, run_worker
):
    tenant = sim_connection("late-epic", customer="Mercy Health", read_timeout=1.0)
    # The EHR applies the order 3 s after receiving it and never answers; our client gives up at 1 s.
    sim_control.set_profile(
        tenant, rate_slow_commit_then_drop=1.0, slow_commit_seconds=3, ignore_if_none_exist=True
    )
    r = client.post(
        "/api/v1/messages",
        json=message_body("late-epic", medication_request(31)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "late-1"},
    )
    assert r.status_code == 202
    run_worker()
    # From now on the EHR applies at once, and it ignores If-None-Exist: a re-send is a duplicate.
    sim_control.set_profile(tenant, preset="default", ignore_if_none_exist=True)
    with transaction(sessions) as s:
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == r.json["id"]))
        assert (item.state, item.category) == ("open", "unknown_outcome")
        exc_id = item.id
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="reconcile"))
    with transaction(sessions) as s:
        decide(
            s, exc_id, s.get(User, users["lena"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "late-1") == 0  # not yet

    # Window: the first attempt's start + 1 s read timeout + 4 s grace, past the EHR's 3 s commit.
    runtime.reconcile_grace_seconds = 4
    with transaction(sessions, read_only=True) as s:
        first_start = s.scalar(sa.select(Attempt.started_at).where(Attempt.message_id == r.json["id"]))
    started = time.monotonic()
    run_worker()  # the replay is deferred, not claimed; burst mode drains it once its window closes
    waited = time.monotonic() - started
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        attempts = s.scalars(sa.select(Attempt).where(Attempt.message_id == r.json["id"])).all()
    assert item.state == "resolved", item.detail
    assert "found already applied" in attempts[-1].detail
    assert waited >= 2.0  # it waited for the window rather than search at once
    with transaction(sessions, read_only=True) as s:
        replay = s.scalar(sa.select(Replay).where(Replay.exception_id == exc_id))
    assert replay.not_before == first_start + timedelta(seconds=5)
    assert replay.started_at >= replay.not_before  # claimed only once the window had closed
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "late-1") == 1
    assert sim_control.deliveries(tenant) == {"urn:recon:idempotency:svc|late-1": 1}  # one create only
