"""Bulk replay (issue 6) through its services: one approval for a fixed list, paced releases (an
injected clock), pause, resume, cancel; every decision audited; each item its own replay."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from app.db.bulk_replay_models import BulkReplay, BulkReplayItem
from app.db.models import AuditEvent, AuditPending, Decision, ExceptionItem, OutboxEntry, Replay, User
from app.db.session import transaction
from app.domain.bulk_replay import Pace
from app.domain.errors import Conflict, Forbidden, Invalid
from app.services import bulk_replay
from tests.conftest import PASSWORD
from tests.factories import setup_connection
from tests.integration.bulk_helpers import rejected_orders

T0 = datetime(2030, 1, 1, 12, 0, 0)


@pytest.fixture
def orders(sessions, users):
    setup_connection(sessions)
    return rejected_orders(sessions, users["svc"], 12)


def request(sessions, users, ids, who="rita", pace=Pace(5, 1.0), reason="EHR fixed the code table"):
    with transaction(sessions) as s:
        batch = bulk_replay.request_batch(
            s, s.get(User, users[who].id), [(i, None) for i in ids], reason, pace
        )
        return batch.id


def decide(sessions, users, batch_id, who, action, **kwargs):
    with transaction(sessions) as s:
        return bulk_replay.decide_batch(s, batch_id, s.get(User, users[who].id), action, **kwargs).state


def approved(sessions, users, ids, **kwargs) -> int:
    batch_id = request(sessions, users, ids, **kwargs)
    decide(sessions, users, batch_id, "lena", "approve", password=PASSWORD)
    return batch_id


def states(sessions, ids) -> dict[int, str]:
    with transaction(sessions, read_only=True) as s:
        return dict(
            s.execute(sa.select(ExceptionItem.id, ExceptionItem.state).where(ExceptionItem.id.in_(ids))).all()
        )


def audited(sessions, subject_type: str, subject_id) -> list[str]:
    """Every event about a subject in recording order, sealed or not yet sealed."""
    by_seq = {}
    with transaction(sessions, read_only=True) as s:
        for model in (AuditPending, AuditEvent):
            by_seq.update(
                s.execute(
                    sa.select(model.seq, model.action).where(
                        model.subject_type == subject_type, model.subject_id == str(subject_id)
                    )
                ).all()
            )
    return [by_seq[k] for k in sorted(by_seq)]


def test_request_holds_every_listed_exception_pending_approval_with_its_own_decision(sessions, users, orders):
    batch_id = request(sessions, users, orders)
    assert set(states(sessions, orders).values()) == {"pending_approval"}
    with transaction(sessions, read_only=True) as s:
        batch = s.get(BulkReplay, batch_id)
        assert (batch.state, batch.total, batch.requested_by_id) == ("requested", 12, users["rita"].id)
        positions = s.scalars(
            sa.select(BulkReplayItem.exception_id)
            .where(BulkReplayItem.bulk_replay_id == batch_id)
            .order_by(BulkReplayItem.position)
        ).all()
        assert positions == orders  # the fixed list, in the order listed
        decisions = s.scalars(sa.select(Decision).where(Decision.exception_id == orders[0])).all()
        assert [(d.action, d.actor, d.details["bulk_replay_id"]) for d in decisions] == [
            ("resubmit", "rita", batch_id)
        ]
        assert s.scalar(sa.select(sa.func.count()).select_from(Replay)) == 0  # nothing runs before approval
    assert "bulk_replay.request" in audited(sessions, "bulk_replay", batch_id)
    assert "decision.resubmit" in audited(sessions, "exception", orders[0])


def test_request_is_all_or_nothing_and_names_what_cannot_be_replayed(sessions, users, orders):
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, orders[3])
        item.state = "resolved"
    with pytest.raises(Conflict) as refused:
        request(sessions, users, orders)
    assert f"#{orders[3]}" in refused.value.message and refused.value.code == "items_not_replayable"
    assert states(sessions, orders[:3]) == {i: "open" for i in orders[:3]}  # nothing requested
    with pytest.raises(Conflict), transaction(sessions) as s:  # changed since the list was shown
        bulk_replay.request_batch(s, s.get(User, users["rita"].id), [(orders[0], 99)], "x")
    with pytest.raises(Invalid):  # a reason is required, as for a single resubmit
        request(sessions, users, orders[:2], reason=" ")
    with pytest.raises(Forbidden):  # auditors do not request replays
        request(sessions, users, orders[:2], who="audrey")


def test_an_exception_in_a_batch_cannot_join_another(sessions, users, orders):
    request(sessions, users, orders[:5])
    with pytest.raises(Conflict):
        request(sessions, users, orders[4:6], who="ravi")


def test_approver_cannot_approve_own_bulk_request(sessions, users, orders):
    batch_id = request(sessions, users, orders, who="lena")
    with pytest.raises(Forbidden) as own:
        decide(sessions, users, batch_id, "lena", "approve", password=PASSWORD)
    assert own.value.code == "self_approval"
    with pytest.raises(Forbidden):  # a reviewer is not a clinical lead
        decide(sessions, users, batch_id, "rita", "approve", password=PASSWORD)
    assert decide(sessions, users, batch_id, "leo", "approve", password=PASSWORD) == "approved"


def test_bulk_approval_needs_the_password_and_a_wrong_one_counts_towards_the_lock(sessions, users, orders):
    batch_id = request(sessions, users, orders)
    for _ in range(5):
        with pytest.raises(bulk_replay.BulkApprovalPasswordFailed):
            decide(sessions, users, batch_id, "lena", "approve", password="wrong")
        with transaction(sessions) as s:
            bulk_replay.record_password_failure(s, users["lena"].id, batch_id)
    assert audited(sessions, "bulk_replay", batch_id).count("approval.password_failed") == 5
    with pytest.raises(Forbidden) as locked:
        decide(sessions, users, batch_id, "lena", "approve", password=PASSWORD)
    assert locked.value.code == "approval_locked"


def test_one_approval_releases_each_item_as_its_own_replay_paced_per_connection(sessions, users, orders):
    batch_id = approved(sessions, users, orders, pace=Pace(5, 1.0))
    first = bulk_replay.release_due(sessions, horizon_seconds=1.0, now=T0)
    assert first.released == 6  # slots at 0.0, 0.2 ... 1.0 s
    second = bulk_replay.release_due(sessions, horizon_seconds=1.0, now=T0 + timedelta(seconds=0.5))
    assert second.released == 2  # 1.2 and 1.4 s: one spacing after the last slot, up to now + 1 s
    with transaction(sessions, read_only=True) as s:
        batch = s.get(BulkReplay, batch_id)
        assert batch.state == "running"
        items = s.scalars(
            sa.select(BulkReplayItem)
            .where(BulkReplayItem.bulk_replay_id == batch_id)
            .order_by(BulkReplayItem.position)
        ).all()
        released = [i for i in items if i.state == "released"]
        assert [i.exception_id for i in released] == orders[:8]  # in listed order
        slots = [i.release_at for i in released]
        assert slots == [T0 + timedelta(milliseconds=200 * k) for k in range(8)]
        replays = {r.id: r for r in s.scalars(sa.select(Replay))}
        assert len(replays) == 8
        for item in released:
            replay = replays[item.replay_id]
            assert (replay.state, replay.exception_id) == ("queued", item.exception_id)
            assert (replay.requested_by_id, replay.approved_by_id) == (users["rita"].id, users["lena"].id)
            outbox = s.scalars(
                sa.select(OutboxEntry).where(
                    OutboxEntry.kind == "replay", OutboxEntry.ref_id == str(replay.id)
                )
            ).all()
            assert [o.job_id for o in outbox] == [f"replay-{replay.id}"]  # the single replay's job
        assert {
            e.state for e in s.scalars(sa.select(ExceptionItem).where(ExceptionItem.id.in_(orders[:8])))
        } == {"replaying"}
        assert bulk_replay.progress(s, batch_id).as_dict() == {
            "total": 12,
            "held": 4,
            "released": 8,
            "delivered": 0,
            "failed": 0,
            "cancelled": 0,
        }
    assert audited(sessions, "exception", orders[0])[-1] == "bulk_replay.release"
    assert "bulk_replay.start" in audited(sessions, "bulk_replay", batch_id)


def test_two_batches_on_one_connection_share_its_pace(sessions, users, orders):
    approved(sessions, users, orders[:6], pace=Pace(5, 1.0))
    approved(sessions, users, orders[6:], who="ravi", pace=Pace(5, 1.0))
    bulk_replay.release_due(sessions, horizon_seconds=1.0, now=T0)
    with transaction(sessions, read_only=True) as s:
        slots = sorted(
            s.scalars(sa.select(BulkReplayItem.release_at).where(BulkReplayItem.release_at.is_not(None)))
        )
    assert slots == [T0 + timedelta(milliseconds=200 * k) for k in range(6)]  # not 12 in one second


def test_pause_holds_the_rest_and_resume_continues(sessions, users, orders):
    batch_id = approved(sessions, users, orders)
    bulk_replay.release_due(sessions, horizon_seconds=0.4, now=T0)  # 3 released
    assert decide(sessions, users, batch_id, "rita", "pause", reason="EHR maintenance") == "paused"
    assert bulk_replay.release_due(sessions, horizon_seconds=5, now=T0 + timedelta(seconds=10)).released == 0
    assert decide(sessions, users, batch_id, "ravi", "resume") == "running"
    assert (
        bulk_replay.release_due(sessions, horizon_seconds=0.2, now=T0 + timedelta(seconds=20)).released == 2
    )
    assert [a for a in audited(sessions, "bulk_replay", batch_id) if a.endswith(("pause", "resume"))] == [
        "bulk_replay.pause",
        "bulk_replay.resume",
    ]


def test_cancel_stops_every_held_item_and_released_ones_finish(sessions, users, orders):
    batch_id = approved(sessions, users, orders)
    bulk_replay.release_due(sessions, horizon_seconds=0.4, now=T0)  # 3 released
    with pytest.raises(Invalid):
        decide(sessions, users, batch_id, "rita", "cancel")  # needs a reason
    assert decide(sessions, users, batch_id, "rita", "cancel", reason="wrong batch") == "cancelled"
    assert bulk_replay.release_due(sessions, horizon_seconds=5, now=T0 + timedelta(seconds=1)).released == 0
    by_state = states(sessions, orders)
    assert [by_state[i] for i in orders[:3]] == ["replaying"] * 3  # released: they run to their end
    assert [by_state[i] for i in orders[3:]] == ["open"] * 9  # back in their queue
    with transaction(sessions, read_only=True) as s:
        assert bulk_replay.progress(s, batch_id).as_dict() == {
            "total": 12,
            "held": 0,
            "released": 3,
            "delivered": 0,
            "failed": 0,
            "cancelled": 9,
        }
        # the released replays finish: one delivered, one failed, one lost
        for replay, state in zip(
            s.scalars(sa.select(Replay).order_by(Replay.id)), ["succeeded", "failed", "lost"], strict=True
        ):
            replay.state = state
    with transaction(sessions) as s:
        for replay, state in zip(
            s.scalars(sa.select(Replay).order_by(Replay.id)), ["succeeded", "failed", "lost"], strict=True
        ):
            replay.state = state
    step = bulk_replay.release_due(sessions, now=T0 + timedelta(seconds=2))
    assert step.settled == 3
    with transaction(sessions, read_only=True) as s:
        done = bulk_replay.progress(s, batch_id)
        assert (done.delivered, done.failed, done.cancelled, done.adds_up) == (1, 2, 9, True)
        assert s.get(BulkReplay, batch_id).state == "cancelled"
    assert "decision.cancel" in audited(sessions, "exception", orders[5])


def test_reject_returns_every_item_to_its_queue(sessions, users, orders):
    batch_id = request(sessions, users, orders)
    with pytest.raises(Forbidden):
        decide(sessions, users, batch_id, "ravi", "reject", reason="no")  # a lead's decision
    assert decide(sessions, users, batch_id, "lena", "reject", reason="wait for the EHR fix") == "rejected"
    assert set(states(sessions, orders).values()) == {"open"}
    with pytest.raises(Conflict):
        decide(sessions, users, batch_id, "leo", "approve", password=PASSWORD)


def test_a_batch_completes_when_nothing_is_held_or_in_flight(sessions, users, orders):
    batch_id = approved(sessions, users, orders[:2])
    bulk_replay.release_due(sessions, now=T0)
    with transaction(sessions) as s:
        for replay in s.scalars(sa.select(Replay)):
            replay.state = "succeeded"
    result = bulk_replay.release_due(sessions, now=T0 + timedelta(seconds=1))
    assert (result.settled, result.completed) == (2, 1)
    with transaction(sessions, read_only=True) as s:
        assert s.get(BulkReplay, batch_id).state == "completed"
    assert audited(sessions, "bulk_replay", batch_id)[-1] == "bulk_replay.complete"


def test_an_open_circuit_keeps_items_held(sessions, users, orders):
    from app.db.models import Connection

    approved(sessions, users, orders[:3])
    with transaction(sessions) as s:
        for conn in s.scalars(sa.select(Connection)):
            conn.circuit_open_until = T0 + timedelta(minutes=1)
    assert bulk_replay.release_due(sessions, now=T0).released == 0
    assert bulk_replay.release_due(sessions, now=T0 + timedelta(minutes=2)).released == 3


def test_a_connection_paused_for_maintenance_keeps_items_held(sessions, users, orders):
    from app.db.models import Connection

    approved(sessions, users, orders[:2])
    with transaction(sessions) as s:
        for conn in s.scalars(sa.select(Connection)):
            conn.paused_at, conn.paused_until = T0, T0 + timedelta(minutes=5)
    assert bulk_replay.release_due(sessions, now=T0 + timedelta(minutes=1)).released == 0
    assert bulk_replay.release_due(sessions, now=T0 + timedelta(minutes=6)).released == 2


def test_stale_version_is_a_conflict(sessions, users, orders):
    batch_id = approved(sessions, users, orders[:2])
    with pytest.raises(Conflict):
        decide(sessions, users, batch_id, "rita", "pause", expected_version=1)


def test_a_held_exception_cannot_be_approved_or_rejected_on_its_own(sessions, users, orders):
    from app.services.exceptions import DecisionInput
    from app.services.exceptions import decide as decide_one

    request(sessions, users, orders[:2])
    for action, fields in (("approve", {"password": PASSWORD}), ("reject", {"reason": "no"})):
        with pytest.raises(Conflict), transaction(sessions) as s:
            decide_one(s, orders[0], s.get(User, users["lena"].id), DecisionInput(action, **fields))
    assert states(sessions, orders[:1]) == {orders[0]: "pending_approval"}  # the batch decides it
