"""SPEC 3.1: every allowed transition, every refused one."""

import itertools

import pytest

from app.domain.errors import Conflict, Forbidden, Invalid
from app.domain.roles import Role
from app.domain.states import (
    RULES,
    Action,
    DecisionRequest,
    DiscardReason,
    ExceptionFacts,
    ExceptionState,
    plan_transition,
)

S = ExceptionState
A = Action

# The table of SPEC 3.1, written out independently of RULES so a typo in either shows.
ALLOWED = {
    (A.RESUBMIT, S.OPEN): S.PENDING_APPROVAL,
    (A.RESUBMIT, S.ESCALATED): S.PENDING_APPROVAL,
    (A.RESUBMIT_CORRECTED, S.OPEN): S.PENDING_APPROVAL,
    (A.RESUBMIT_CORRECTED, S.ESCALATED): S.PENDING_APPROVAL,
    (A.APPROVE, S.PENDING_APPROVAL): S.REPLAYING,
    (A.REJECT, S.PENDING_APPROVAL): S.OPEN,
    (A.ESCALATE, S.OPEN): S.ESCALATED,
    (A.DISCARD, S.OPEN): S.DISCARDED,
    (A.DISCARD, S.ESCALATED): S.DISCARDED,
    (A.CONFIRM_NOT_APPLIED, S.OPEN): S.OPEN,
    (A.CONFIRM_NOT_APPLIED, S.ESCALATED): S.OPEN,
    **{(a, s): s for a in (A.COMMENT, A.ASSIGN, A.CLAIM) for s in S if s not in (S.RESOLVED, S.DISCARDED)},
}
WHO = {
    A.RESUBMIT: {Role.REVIEWER, Role.CLINICAL_LEAD},
    A.RESUBMIT_CORRECTED: {Role.REVIEWER, Role.CLINICAL_LEAD},
    A.APPROVE: {Role.CLINICAL_LEAD},
    A.REJECT: {Role.CLINICAL_LEAD},
    A.ESCALATE: {Role.REVIEWER},
    A.DISCARD: {Role.REVIEWER, Role.CLINICAL_LEAD},
    A.CONFIRM_NOT_APPLIED: {Role.CLINICAL_LEAD},
    A.COMMENT: {Role.REVIEWER, Role.CLINICAL_LEAD},
    A.ASSIGN: {Role.REVIEWER, Role.CLINICAL_LEAD},
    A.CLAIM: {Role.REVIEWER, Role.CLINICAL_LEAD},
}


def request(action: Action, role: Role, actor_id: int = 1, **kw) -> DecisionRequest:
    defaults = {"reason": "because the EHR said so"}
    if action is A.DISCARD:
        defaults["reason_code"] = "duplicate"
    if action is A.RESUBMIT_CORRECTED:
        defaults["corrected_payload"] = '{"resourceType": "MedicationRequest"}'
    if action is A.APPROVE:
        defaults["password_confirmed"] = True
    defaults.update(kw)
    return DecisionRequest(action=action, actor_id=actor_id, actor_role=role, **defaults)


def facts(state: ExceptionState, action: Action) -> ExceptionFacts:
    return ExceptionFacts(
        state=state,
        category="unknown_outcome" if action is A.CONFIRM_NOT_APPLIED else "ehr_rejected",
        needs_not_applied_confirmation=action is A.CONFIRM_NOT_APPLIED,
        replay_requested_by=99,
    )


def test_rules_match_the_spec_table():
    derived = {
        (action, state): (rule.to_state or state)
        for action, rule in RULES.items()
        for state in rule.from_states
    }
    assert derived == ALLOWED
    assert {a: set(r.roles) for a, r in RULES.items()} == WHO


@pytest.mark.parametrize(("action", "state"), sorted(ALLOWED, key=str))
def test_every_allowed_transition(action, state):
    for role in WHO[action]:
        assert plan_transition(facts(state, action), request(action, role)) is ALLOWED[(action, state)]


@pytest.mark.parametrize(
    ("action", "state"),
    [(a, s) for a, s in itertools.product(Action, ExceptionState) if (a, s) not in ALLOWED],
)
def test_every_refused_transition_is_a_conflict(action, state):
    role = next(iter(WHO[action]))
    with pytest.raises(Conflict):
        plan_transition(facts(state, action), request(action, role))


@pytest.mark.parametrize(
    ("action", "role"),
    [(a, r) for a, r in itertools.product(Action, Role) if r not in WHO[a]],
)
def test_every_role_without_the_right_is_forbidden(action, role):
    state = next(s for (a, s) in ALLOWED if a is action)
    with pytest.raises(Forbidden):
        plan_transition(facts(state, action), request(action, role))


def test_approver_cannot_approve_own_request():
    f = ExceptionFacts(S.PENDING_APPROVAL, "ehr_rejected", replay_requested_by=7)
    with pytest.raises(Forbidden, match="four-eyes"):
        plan_transition(f, request(A.APPROVE, Role.CLINICAL_LEAD, actor_id=7))
    assert plan_transition(f, request(A.APPROVE, Role.CLINICAL_LEAD, actor_id=8)) is S.REPLAYING


def test_approve_needs_password_reentry():
    f = ExceptionFacts(S.PENDING_APPROVAL, "ehr_rejected", replay_requested_by=7)
    with pytest.raises(Forbidden, match="password"):
        plan_transition(f, request(A.APPROVE, Role.CLINICAL_LEAD, actor_id=8, password_confirmed=False))


def test_discard_needs_a_known_reason_code():
    f = ExceptionFacts(S.OPEN, "ehr_rejected")
    with pytest.raises(Invalid):
        plan_transition(f, request(A.DISCARD, Role.REVIEWER, reason_code=None))
    with pytest.raises(Invalid):
        plan_transition(f, request(A.DISCARD, Role.REVIEWER, reason_code="because"))
    for code in DiscardReason:
        assert plan_transition(f, request(A.DISCARD, Role.REVIEWER, reason_code=code.value)) is S.DISCARDED


def test_discard_other_needs_free_text():
    f = ExceptionFacts(S.OPEN, "ehr_rejected")
    with pytest.raises(Invalid):
        plan_transition(f, request(A.DISCARD, Role.REVIEWER, reason_code="other", reason="  "))


@pytest.mark.parametrize("action", [A.RESUBMIT, A.REJECT, A.ESCALATE, A.COMMENT, A.RESUBMIT_CORRECTED])
def test_actions_that_need_a_reason(action):
    state = next(s for (a, s) in ALLOWED if a is action)
    with pytest.raises(Invalid):
        plan_transition(facts(state, action), request(action, next(iter(WHO[action])), reason=""))


def test_resubmit_corrected_needs_a_payload():
    with pytest.raises(Invalid):
        plan_transition(
            facts(S.OPEN, A.RESUBMIT_CORRECTED),
            request(A.RESUBMIT_CORRECTED, Role.REVIEWER, corrected_payload=""),
        )


def test_unknown_outcome_without_search_needs_confirm_not_applied_before_resubmit():
    f = ExceptionFacts(S.OPEN, "unknown_outcome", needs_not_applied_confirmation=True)
    for action in (A.RESUBMIT, A.RESUBMIT_CORRECTED):
        with pytest.raises(Conflict, match="confirm_not_applied"):
            plan_transition(f, request(action, Role.REVIEWER))
    assert plan_transition(f, request(A.CONFIRM_NOT_APPLIED, Role.CLINICAL_LEAD)) is S.OPEN


def test_confirm_not_applied_only_when_awaited():
    with pytest.raises(Conflict):
        plan_transition(
            ExceptionFacts(S.OPEN, "ehr_rejected"), request(A.CONFIRM_NOT_APPLIED, Role.CLINICAL_LEAD)
        )


# --- the system's transitions (issue 6: one state model) -------------------------------------------
# Written out again from docs/ARCHITECTURE.md's life of a message, independently of SYSTEM_TRANSITIONS.

from app.domain.states import (  # noqa: E402
    AttemptState,
    IllegalTransition,
    MessageState,
    ReplayState,
    StateKind,
    check_transition,
)

R, T, M = ReplayState, AttemptState, MessageState
RESULTS = (T.DELIVERED, T.REJECTED, T.TRANSIENT, T.UNKNOWN)
SYSTEM_MOVES = {
    StateKind.EXCEPTION: {
        (S.RETRYING, S.RETRYING),
        (S.RETRYING, S.RESOLVED),
        (S.RETRYING, S.OPEN),
        (S.REPLAYING, S.RESOLVED),
        (S.REPLAYING, S.OPEN),
        (S.OPEN, S.ESCALATED),
        (S.OPEN, S.RESOLVED),
        (S.ESCALATED, S.RESOLVED),
    },
    StateKind.REPLAY: {
        (R.QUEUED, R.QUEUED),
        (R.QUEUED, R.RUNNING),
        (R.RUNNING, R.RUNNING),
        (R.RUNNING, R.SUCCEEDED),
        (R.RUNNING, R.FAILED),
        (R.RUNNING, R.LOST),
        (R.PENDING_APPROVAL, R.QUEUED),  # approve
        (R.PENDING_APPROVAL, R.REJECTED),  # reject
    },
    StateKind.ATTEMPT: {
        (T.QUEUED, T.IN_FLIGHT),
        (T.IN_FLIGHT, T.IN_FLIGHT),
        *((T.IN_FLIGHT, to) for to in RESULTS),
        *((T.UNKNOWN, to) for to in RESULTS),
    },
    StateKind.MESSAGE: {
        (M.QUEUED, M.DELIVERING),
        (M.EXCEPTION, M.DELIVERING),
        (M.DELIVERING, M.DELIVERED),
        (M.DELIVERING, M.EXCEPTION),
        (M.EXCEPTION, M.DELIVERED),
        (M.EXCEPTION, M.EXCEPTION),
        (M.QUEUED, M.EXCEPTION),
        (M.EXCEPTION, M.DISCARDED),  # discard
    },
}
HUMAN_EXCEPTION_MOVES = {(frm, to) for (_action, frm), to in ALLOWED.items()}
TYPES = {StateKind.EXCEPTION: S, StateKind.REPLAY: R, StateKind.ATTEMPT: T, StateKind.MESSAGE: M}


@pytest.mark.parametrize("kind", list(StateKind))
def test_check_transition_allows_exactly_the_table(kind):
    allowed = SYSTEM_MOVES[kind] | (HUMAN_EXCEPTION_MOVES if kind is StateKind.EXCEPTION else set())
    states = list(TYPES[kind])
    for frm, to in itertools.product(states, states):
        if (frm, to) in allowed:
            check_transition(kind, frm, to)
        else:
            with pytest.raises(IllegalTransition):
                check_transition(kind, frm, to)


def test_final_states_are_never_left():
    for kind, finals in (
        (StateKind.EXCEPTION, [S.RESOLVED, S.DISCARDED]),
        (StateKind.REPLAY, [R.SUCCEEDED, R.FAILED, R.LOST, R.REJECTED]),
        (StateKind.MESSAGE, [M.DELIVERED, M.DISCARDED]),
    ):
        for frm in finals:
            for to in TYPES[kind]:
                with pytest.raises(IllegalTransition):
                    check_transition(kind, frm, to)


def test_unknown_state_names_are_illegal():
    with pytest.raises(IllegalTransition):
        check_transition("replay", "queued", "sent")
    with pytest.raises(IllegalTransition):
        check_transition("attempt", "done", "delivered")


def test_a_wrong_approval_password_says_so_and_a_missing_one_asks_for_it():
    facts = ExceptionFacts(state=S.PENDING_APPROVAL, category="transport", replay_requested_by=7)
    base = dict(action=A.APPROVE, actor_id=8, actor_role=Role.CLINICAL_LEAD, password_confirmed=False)
    with pytest.raises(Forbidden, match="^wrong password") as wrong:
        plan_transition(facts, DecisionRequest(**base, password_given=True))
    with pytest.raises(Forbidden, match="needs your password") as missing:
        plan_transition(facts, DecisionRequest(**base))
    assert wrong.value.code == missing.value.code == "password_required"
