"""Bulk replay rules (issue 6), written out again from the issue, independently of the code."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.bulk_replay import (
    ApprovalFacts,
    BatchAction,
    BatchState,
    ItemState,
    Pace,
    Progress,
    available_batch_actions,
    check_approval,
    check_item_list,
    item_state,
    parse_batch_action,
    plan_batch_action,
    release_slots,
)
from app.domain.errors import Conflict, Forbidden, Invalid
from app.domain.roles import Role

R, L, A = Role.REVIEWER, Role.CLINICAL_LEAD, Role.AUDITOR
S = BatchState

# (from state, action, role) -> to state; every other combination of a human action is refused.
ALLOWED = {
    (S.REQUESTED, "approve", L): S.APPROVED,
    (S.REQUESTED, "reject", L): S.REJECTED,
    (S.APPROVED, "pause", R): S.PAUSED,
    (S.APPROVED, "pause", L): S.PAUSED,
    (S.RUNNING, "pause", R): S.PAUSED,
    (S.RUNNING, "pause", L): S.PAUSED,
    (S.PAUSED, "resume", R): S.RUNNING,
    (S.PAUSED, "resume", L): S.RUNNING,
    **{
        (s, "cancel", role): S.CANCELLED
        for s in (S.REQUESTED, S.APPROVED, S.RUNNING, S.PAUSED)
        for role in (R, L)
    },
}


@pytest.mark.parametrize("state", list(BatchState))
@pytest.mark.parametrize("action", ["approve", "reject", "pause", "resume", "cancel"])
@pytest.mark.parametrize("role", [R, L, A, Role.ADMIN, Role.SERVICE])
def test_batch_state_machine_is_the_issue_table(state, action, role):
    expected = ALLOWED.get((state, action, role))
    if expected is not None:
        assert plan_batch_action(state, BatchAction(action), role, reason="because") is expected
        assert BatchAction(action) in available_batch_actions(state, role)
    else:
        with pytest.raises((Forbidden, Conflict)):
            plan_batch_action(state, BatchAction(action), role, reason="because")
        assert BatchAction(action) not in available_batch_actions(state, role)


def test_reject_and_cancel_need_a_reason():
    with pytest.raises(Invalid):
        plan_batch_action(S.REQUESTED, BatchAction.REJECT, L, reason="  ")
    with pytest.raises(Invalid):
        plan_batch_action(S.RUNNING, BatchAction.CANCEL, R, reason="")


def test_system_moves_are_not_a_persons():
    assert plan_batch_action(S.APPROVED, BatchAction.START, None) is S.RUNNING
    assert plan_batch_action(S.RUNNING, BatchAction.COMPLETE, None) is S.COMPLETED
    assert plan_batch_action(S.PAUSED, BatchAction.COMPLETE, None) is S.COMPLETED
    with pytest.raises(Forbidden):
        plan_batch_action(S.APPROVED, BatchAction.START, L)
    with pytest.raises(Forbidden):
        plan_batch_action(S.RUNNING, BatchAction.CANCEL, None, reason="x")
    with pytest.raises(Invalid):
        parse_batch_action("complete")
    with pytest.raises(Invalid):
        parse_batch_action("approve_all")


def test_a_batch_is_a_fixed_list_without_repeats():
    check_item_list([3, 1, 2])
    with pytest.raises(Invalid):
        check_item_list([])
    with pytest.raises(Invalid):
        check_item_list([1, 2, 1])
    with pytest.raises(Invalid):
        check_item_list(list(range(1001)))


# --- four-eyes: the single replay's rule ----------------------------------------------------------


def approve(facts, actor_id, role=L, password=True, enrolled_by=frozenset(), locked=False):
    check_approval(
        facts,
        actor_id=actor_id,
        role=role,
        password_confirmed=password,
        actor_enrolled_by=frozenset(enrolled_by),
        approvals_locked=locked,
    )


def test_approver_is_a_clinical_lead_who_is_not_the_requester():
    facts = ApprovalFacts(requested_by=1)
    approve(facts, actor_id=2)
    with pytest.raises(Forbidden) as own:
        approve(facts, actor_id=1)
    assert own.value.code == "self_approval"
    with pytest.raises(Forbidden) as reviewer:
        approve(facts, actor_id=2, role=R)
    assert reviewer.value.code == "role_forbidden"


def test_batch_approval_needs_the_password_and_unlocked_approvals():
    facts = ApprovalFacts(requested_by=1)
    with pytest.raises(Forbidden) as no_password:
        approve(facts, actor_id=2, password=False)
    assert no_password.value.code == "password_required"
    with pytest.raises(Forbidden) as locked:
        approve(facts, actor_id=2, locked=True)
    assert locked.value.code == "approval_locked"


def test_editor_of_a_listed_payload_or_the_requesters_enroller_cannot_approve():
    with pytest.raises(Forbidden):
        approve(ApprovalFacts(requested_by=1, edited_by=frozenset({2})), actor_id=2)
    with pytest.raises(Forbidden) as enroller:
        approve(ApprovalFacts(requested_by=1, parties_enrolled_by=frozenset({2})), actor_id=2)
    assert enroller.value.code == "enrolment_conflict"
    with pytest.raises(Forbidden):
        approve(ApprovalFacts(requested_by=1), actor_id=2, enrolled_by={1})


# --- pacing (an injected clock) -------------------------------------------------------------------

T0 = datetime(2026, 1, 1, 12, 0, 0)


def test_five_per_second_are_evenly_spaced_from_now():
    slots = release_slots(100, None, Pace(5, 1.0), T0, horizon=timedelta(seconds=1))
    assert slots == [T0 + timedelta(milliseconds=200 * i) for i in range(6)]  # 0.0 .. 1.0 s


def test_next_step_continues_one_spacing_after_the_last_release():
    first = release_slots(100, None, Pace(5, 1.0), T0, horizon=timedelta(seconds=1))
    # the next step runs early (0.5 s later): it starts after the last slot, never before
    second = release_slots(100, first[-1], Pace(5, 1.0), T0 + timedelta(seconds=0.5), timedelta(seconds=1))
    assert second[0] == first[-1] + timedelta(milliseconds=200)


def test_no_catch_up_burst_after_an_idle_gap():
    last = T0
    later = T0 + timedelta(minutes=10)
    slots = release_slots(100, last, Pace(5, 1.0), later, horizon=timedelta(seconds=1))
    assert slots[0] == later and len(slots) == 6


def test_releases_stop_at_what_is_pending():
    assert release_slots(3, None, Pace(5, 1.0), T0, timedelta(seconds=10)) == [
        T0,
        T0 + timedelta(milliseconds=200),
        T0 + timedelta(milliseconds=400),
    ]
    assert release_slots(0, None, Pace(), T0, timedelta(seconds=10)) == []


def test_pace_has_sane_bounds():
    assert Pace().count == 5 and Pace().per_seconds == 1.0
    for bad in ({"count": 0}, {"count": 1001}, {"per_seconds": 0.01}, {"per_seconds": 7200}, {"count": 2.5}):
        with pytest.raises(Invalid):
            Pace(**bad)


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(1, 20),
    per_ms=st.integers(100, 5000),
    horizon_ms=st.integers(0, 5000),
    gaps_ms=st.lists(st.integers(0, 4000), min_size=1, max_size=25),
    pending=st.integers(0, 400),
)
def test_any_window_of_the_interval_holds_at_most_count_releases(count, per_ms, horizon_ms, gaps_ms, pending):
    """Steps at arbitrary times (early, late, repeated): over every slot planned on a connection,
    any half-open window of the interval holds at most `count` releases."""
    pace = Pace(count, per_ms / 1000)
    now, last, planned = T0, None, []
    for gap in gaps_ms:
        now += timedelta(milliseconds=gap)
        slots = release_slots(pending - len(planned), last, pace, now, timedelta(milliseconds=horizon_ms))
        assert all(slot >= now for slot in slots)  # never in the past
        planned += slots
        last = planned[-1] if planned else last
    assert len(planned) <= pending
    assert planned == sorted(planned)
    window = timedelta(milliseconds=per_ms)
    for i, start in enumerate(planned):
        inside = sum(1 for slot in planned[i:] if slot < start + window)
        assert inside <= count


# --- progress -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(ItemState)), max_size=600))
def test_progress_adds_up_for_any_mix_of_item_states(states):
    progress = Progress.of(states)
    assert progress.total == len(states)
    assert progress.adds_up
    assert (
        progress.held + progress.released + progress.delivered + progress.failed + progress.cancelled
        == len(states)
    )
    assert 0 <= progress.percent_done <= 100
    assert progress.settled == all(
        s in (ItemState.DELIVERED, ItemState.FAILED, ItemState.CANCELLED) for s in states
    )
    assert Progress.from_counts({s.value: states.count(s) for s in set(states)}) == progress


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(ItemState)),
            st.sampled_from([None, "queued", "running", "succeeded", "failed", "lost", "rejected"]),
        ),
        max_size=300,
    )
)
def test_progress_of_released_items_following_their_replays_still_adds_up(pairs):
    progress = Progress.of(item_state(stored, replay) for stored, replay in pairs)
    assert progress.adds_up and progress.total == len(pairs)


def test_a_released_item_follows_its_replay():
    assert item_state("released", "queued") is ItemState.RELEASED
    assert item_state("released", "running") is ItemState.RELEASED
    assert item_state("released", "succeeded") is ItemState.DELIVERED
    assert item_state("released", "failed") is ItemState.FAILED
    assert item_state("released", "lost") is ItemState.FAILED
    assert item_state("held", None) is ItemState.HELD
    assert item_state("cancelled", None) is ItemState.CANCELLED


def test_unknown_item_state_is_an_error_not_dropped():
    with pytest.raises(ValueError):
        Progress.from_counts({"held": 1, "mystery": 2})
