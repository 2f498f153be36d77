"""Issue 6, housekeeping by one holder: SLA escalation, due retries, the re-queue of lost hand-offs
and the summary refresh each run once per interval across all workers (a compare-and-set on the
step's row), not on every pass of every worker — and a holder that dies blocks nobody."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.adapters.queue import Housekeeping
from app.db.models import ExceptionItem
from app.db.session import transaction
from app.db.summary_models import HousekeepingTask, ReadSummary
from app.services import schedule
from tests.factories import make_exception

T0 = datetime(2026, 11, 30, 8, 0, 0)
EVERY = {"escalate": 30.0, "retries": 1.0}


def test_one_claimer_wins_each_step_per_interval(sessions):
    with freeze_time(T0):
        assert sorted(schedule.claim(sessions, EVERY, "worker-a")) == ["escalate", "retries"]
        assert schedule.claim(sessions, EVERY, "worker-b") == []
    with freeze_time(T0 + timedelta(seconds=1)):
        assert schedule.claim(sessions, EVERY, "worker-b") == ["retries"]
        assert schedule.claim(sessions, EVERY, "worker-a") == []
    with freeze_time(T0 + timedelta(seconds=29)):
        assert schedule.claim(sessions, EVERY, "worker-a") == ["retries"]
    with freeze_time(T0 + timedelta(seconds=30)):
        assert sorted(schedule.claim(sessions, EVERY, "worker-b")) == ["escalate", "retries"]
    with transaction(sessions, read_only=True) as s:
        rows = dict(s.execute(sa.select(HousekeepingTask.name, HousekeepingTask.holder)).all())
    assert rows["escalate"] == "worker-b" and rows["retries"] == "worker-b"


def test_a_holder_that_died_blocks_only_its_own_interval(sessions):
    with freeze_time(T0):
        assert "retries" in schedule.claim(sessions, EVERY, "doomed")  # ...and is killed right here
        assert schedule.claim(sessions, EVERY, "survivor") == []
    with freeze_time(T0 + timedelta(seconds=1)):
        assert schedule.claim(sessions, EVERY, "survivor") == ["retries"]


def test_a_step_without_a_row_is_added_by_its_first_winner(sessions):
    with freeze_time(T0):
        assert schedule.claim(sessions, {"brand-new": 5.0}, "worker-a") == ["brand-new"]
        assert schedule.claim(sessions, {"brand-new": 5.0}, "worker-b") == []


def test_two_workers_passing_together_escalate_and_refresh_once(sessions, users, runtime, queue):
    with freeze_time(T0 - timedelta(hours=1)):
        breached = make_exception(sessions, users["svc"])  # 30 minute window: breached at T0
    a = Housekeeping(replace(runtime, worker_name="worker-a"), queue)
    b = Housekeeping(replace(runtime, worker_name="worker-b"), queue)
    with freeze_time(T0):
        first, second = a.run_once(), b.run_once()
    assert first["escalated"] == 1 and second["escalated"] == 0
    with transaction(sessions, read_only=True) as s:
        assert s.get(ExceptionItem, breached).state == "escalated"
        holders = dict(s.execute(sa.select(HousekeepingTask.name, HousekeepingTask.holder)).all())
        assert s.scalar(sa.select(ReadSummary.counts_as_of)) == T0
    assert holders == {
        name: "worker-a"
        for name in (
            "escalate",
            "summaries",
            "retries",
            "stranded",
            "audit_checkpoint",
            "bulk_replays",
            "version_check",
            "payload_purge",
        )
    }
    # Half a pass later the retry and re-queue steps are the other worker's to take; escalation
    # and the summaries wait for their own intervals.
    with freeze_time(T0 + timedelta(seconds=runtime.housekeeping_seconds / 2)):
        b.run_once()
    with transaction(sessions, read_only=True) as s:
        holders = dict(s.execute(sa.select(HousekeepingTask.name, HousekeepingTask.holder)).all())
    assert holders["retries"] == "worker-b" and holders["stranded"] == "worker-b"
    assert holders["escalate"] == "worker-a" and holders["summaries"] == "worker-a"


def test_a_burst_run_does_every_step_on_its_first_pass(sessions, users, runtime, queue):
    with freeze_time(T0):
        schedule.claim(
            sessions, {"escalate": 30, "summaries": 10, "retries": 1, "stranded": 1}, "long-running-worker"
        )
    with freeze_time(T0 - timedelta(hours=1)):
        breached = make_exception(sessions, users["svc"])
    with freeze_time(T0 + timedelta(seconds=1)):
        counts = Housekeeping(runtime, queue, shared=False).run_once()
    assert counts["escalated"] == 1
    with transaction(sessions, read_only=True) as s:
        assert s.get(ExceptionItem, breached).state == "escalated"
        assert s.scalar(sa.select(ReadSummary.counts_as_of)) == T0 + timedelta(seconds=1)
