"""Issue 6 'Faults', backoff under a frozen clock: each automatic retry is scheduled at a full-jitter
delay within [0, base·2^n] (the worker's own draw), never before the EHR's Retry-After, never later
than the cap, and after max_auto_retries the item comes back to a human and is never sent again.

The worker's own flow runs (deliver_attempt, schedule_due_retries) with a scripted adapter and a
scripted jitter; freezegun holds the clock, so every scheduled time is exact."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.db.models import Attempt, ExceptionItem
from app.db.session import transaction
from app.domain.delivery import RETRY_CAP_SECONDS, AttemptOutcome, Category, Outcome
from app.services.clock import utcnow
from app.services.delivery import Runtime, deliver_attempt, schedule_due_retries
from tests.samples import medication_request, message_body


class ScriptedEhr:
    """Answers each delivery with the next scripted outcome; counts the calls."""

    def __init__(self, outcomes: list[Outcome]):
        self.outcomes, self.calls = list(outcomes), 0

    def deliver(self, envelope) -> Outcome:
        self.calls += 1
        return self.outcomes.pop(0)

    def find_applied(self, envelope):
        return None

    def close(self) -> None:
        pass


def unavailable(retry_after: float | None = None) -> Outcome:
    status = 429 if retry_after else 503
    return Outcome(
        AttemptOutcome.TRANSIENT,
        Category.EHR_UNAVAILABLE,
        status_code=status,
        provably_not_applied=True,
        retry_after_seconds=retry_after,
        detail=f"{status} before processing",
    )


def queued_attempt(sessions, message_id: str) -> int:
    with transaction(sessions, read_only=True) as s:
        return s.scalar(
            sa.select(Attempt.id).where(Attempt.message_id == message_id, Attempt.outcome == "queued")
        )


def item_of(sessions, message_id: str) -> ExceptionItem:
    with transaction(sessions, read_only=True) as s:
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
        s.expunge(item)
        return item


def test_retries_follow_full_jitter_honour_retry_after_stop_at_the_cap_and_end_with_a_human(
    client, users, sessions, sim_connection
):
    base = 1000.0  # 1000·2^2 = 4000 s is past the cap (3600 s): the third delay is capped
    sim_connection("backoff-fhir", customer="Backoff Health", retry_backoff_seconds=base, max_auto_retries=3)
    ehr = ScriptedEhr([unavailable(), unavailable(retry_after=2500), unavailable(), unavailable()])
    draws = [0.5, 0.1, 0.999]
    rt = Runtime(
        sessions=sessions,
        worker_name="backoff",
        adapter_factory=lambda conn: ehr,
        jitter=lambda: draws.pop(0),
    )
    with freeze_time(utcnow()) as clock:
        r = client.post(
            "/api/v1/messages",
            json=message_body("backoff-fhir", medication_request(7)),
            headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "backoff-1"},
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        message_id = r.json["id"]

        # (what the EHR answers, the delay the worker must choose) for the first three failures.
        expected = [
            (503, 0.5 * base),  # retry 0: ceiling base·2^0, draw 0.5
            (429, 2500.0),  # retry 1: the draw gives 0.1·2000 = 200 s, Retry-After 2500 s is the floor
            (503, 0.999 * RETRY_CAP_SECONDS),  # retry 2: ceiling min(cap, 4000) = 3600
        ]
        for n, (status, delay) in enumerate(expected):
            failed_at = utcnow()
            assert deliver_attempt(rt, queued_attempt(sessions, message_id))
            item = item_of(sessions, message_id)
            assert (item.state, item.retry_count) == ("retrying", n), f"failure {n + 1} ({status})"
            assert item.next_retry_at == failed_at + timedelta(seconds=delay), f"failure {n + 1} ({status})"
            clock.move_to(item.next_retry_at - timedelta(seconds=1))
            assert schedule_due_retries(rt) == 0  # not a second early
            clock.tick(1)
            assert schedule_due_retries(rt) == 1
        assert ehr.calls == 3

        deliver_attempt(rt, queued_attempt(sessions, message_id))  # the fourth failure: budget spent
        item = item_of(sessions, message_id)
        assert item.state == "open" and item.category == "ehr_unavailable"
        assert "automatic retries stopped" in item.detail
        clock.tick(10 * RETRY_CAP_SECONDS)
        assert schedule_due_retries(rt) == 0
        assert queued_attempt(sessions, message_id) is None
    assert ehr.calls == 4 and not draws  # one draw per scheduled retry, none after exhaustion
