"""Every state the product keeps, and who may move it where (SPEC 3.1).

Human decisions on exceptions: `RULES` and `plan_transition`, which is pure: given the current
exception facts, the actor and the action, it returns the target state or raises Forbidden /
Conflict / Invalid. The system's own moves (the worker, the retry scheduler, the reaper, the SLA
escalation) of exceptions, replays, attempts and messages: `SYSTEM_TRANSITIONS` and
`check_transition`. The service layer applies either with one compare-and-set (app/db/cas.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .errors import Conflict, Forbidden, Invalid
from .roles import Role


class ExceptionState(StrEnum):
    OPEN = "open"
    RETRYING = "retrying"
    ESCALATED = "escalated"
    PENDING_APPROVAL = "pending_approval"
    REPLAYING = "replaying"
    RESOLVED = "resolved"
    DISCARDED = "discarded"


FINAL_STATES = frozenset({ExceptionState.RESOLVED, ExceptionState.DISCARDED})


class ReplayState(StrEnum):
    """replays.state: requested → approved (queued) → claimed by a worker (running) → settled."""

    PENDING_APPROVAL = "pending_approval"
    REJECTED = "rejected"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # its worker died mid-call (the reaper): outcome unknown


class AttemptState(StrEnum):
    """attempts.outcome: queued → in_flight (claimed, leased) → one of the adapter's outcomes."""

    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    REJECTED = "rejected"
    TRANSIENT = "transient"
    UNKNOWN = "unknown"


class MessageState(StrEnum):
    """messages.status: where the logical message stands as a whole."""

    QUEUED = "queued"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    EXCEPTION = "exception"
    DISCARDED = "discarded"


class StateKind(StrEnum):
    EXCEPTION = "exception"
    REPLAY = "replay"
    ATTEMPT = "attempt"
    MESSAGE = "message"


STATE_TYPES: dict[StateKind, type[StrEnum]] = {
    StateKind.EXCEPTION: ExceptionState,
    StateKind.REPLAY: ReplayState,
    StateKind.ATTEMPT: AttemptState,
    StateKind.MESSAGE: MessageState,
}


class Action(StrEnum):
    RESUBMIT = "resubmit"
    RESUBMIT_CORRECTED = "resubmit_corrected"
    APPROVE = "approve"
    REJECT = "reject"
    ESCALATE = "escalate"
    DISCARD = "discard"
    CONFIRM_NOT_APPLIED = "confirm_not_applied"
    COMMENT = "comment"
    ASSIGN = "assign"
    CLAIM = "claim"


class DiscardReason(StrEnum):
    DUPLICATE = "duplicate"
    SUPERSEDED = "superseded"
    APPLIED_MANUALLY = "applied_manually"
    TEST_MESSAGE = "test_message"
    PATIENT_MERGED = "patient_merged"
    OTHER = "other"


_REVIEWERS = frozenset({Role.REVIEWER, Role.CLINICAL_LEAD})
_LEADS = frozenset({Role.CLINICAL_LEAD})
_NON_FINAL = frozenset(ExceptionState) - FINAL_STATES


@dataclass(frozen=True)
class Rule:
    from_states: frozenset[ExceptionState]
    roles: frozenset[Role]
    to_state: ExceptionState | None  # None: state unchanged


RULES: dict[Action, Rule] = {
    Action.RESUBMIT: Rule(
        frozenset({ExceptionState.OPEN, ExceptionState.ESCALATED}),
        _REVIEWERS,
        ExceptionState.PENDING_APPROVAL,
    ),
    Action.RESUBMIT_CORRECTED: Rule(
        frozenset({ExceptionState.OPEN, ExceptionState.ESCALATED}),
        _REVIEWERS,
        ExceptionState.PENDING_APPROVAL,
    ),
    Action.APPROVE: Rule(frozenset({ExceptionState.PENDING_APPROVAL}), _LEADS, ExceptionState.REPLAYING),
    Action.REJECT: Rule(frozenset({ExceptionState.PENDING_APPROVAL}), _LEADS, ExceptionState.OPEN),
    Action.ESCALATE: Rule(
        frozenset({ExceptionState.OPEN}), frozenset({Role.REVIEWER}), ExceptionState.ESCALATED
    ),
    Action.DISCARD: Rule(
        frozenset({ExceptionState.OPEN, ExceptionState.ESCALATED}), _REVIEWERS, ExceptionState.DISCARDED
    ),
    Action.CONFIRM_NOT_APPLIED: Rule(
        frozenset({ExceptionState.OPEN, ExceptionState.ESCALATED}), _LEADS, ExceptionState.OPEN
    ),
    Action.COMMENT: Rule(_NON_FINAL, _REVIEWERS, None),
    Action.ASSIGN: Rule(_NON_FINAL, _REVIEWERS, None),
    Action.CLAIM: Rule(_NON_FINAL, _REVIEWERS, None),
}


@dataclass(frozen=True)
class ExceptionFacts:
    """What the rules need to know about an exception, independent of storage."""

    state: ExceptionState
    category: str
    needs_not_applied_confirmation: bool = False
    replay_requested_by: int | None = None  # user id of the pending replay's requester
    # People, not only accounts (issue 7): who created a payload version of the pending replay's
    # message, and which accounts created/enrolled the requester's and the editors' accounts.
    replay_edited_by: frozenset[int] = frozenset()
    replay_parties_enrolled_by: frozenset[int] = frozenset()


@dataclass(frozen=True)
class DecisionRequest:
    action: Action
    actor_id: int
    actor_role: Role
    reason: str = ""
    reason_code: str | None = None
    corrected_payload: str | None = None
    password_confirmed: bool = False
    password_given: bool = False  # a password was entered (wrong when not confirmed)
    # accounts that created the actor's account or issued the link its password was set with
    actor_enrolled_by: frozenset[int] = frozenset()
    approvals_locked: bool = False  # too many wrong approval passwords; an admin must clear it


def password_refusal(password_given: bool) -> str:
    """What an approver is told when the re-entered password does not confirm them."""
    if password_given:
        return "wrong password: re-enter your own login password to approve"
    return "approval needs your password re-entered"


def parse_action(value: str) -> Action:
    try:
        return Action(value)
    except ValueError:
        raise Invalid(f"unknown action {value!r}", code="unknown_action") from None


def validate_request(req: DecisionRequest) -> None:
    """Content rules that do not depend on state: reasons, reason codes, payloads."""
    reason = (req.reason or "").strip()
    if req.action is Action.DISCARD:
        if req.reason_code is None:
            raise Invalid("discard needs a reason code", code="reason_code_required")
        try:
            code = DiscardReason(req.reason_code)
        except ValueError:
            raise Invalid(
                f"unknown discard reason code {req.reason_code!r}", code="unknown_reason_code"
            ) from None
        if code is DiscardReason.OTHER and not reason:
            raise Invalid("reason code 'other' needs a free-text reason", code="reason_required")
    elif req.reason_code is not None and req.action is not Action.ASSIGN:
        raise Invalid(f"action {req.action} takes no reason code", code="unknown_reason_code")
    if (
        req.action
        in (
            Action.RESUBMIT,
            Action.RESUBMIT_CORRECTED,
            Action.REJECT,
            Action.ESCALATE,
            Action.CONFIRM_NOT_APPLIED,
            Action.COMMENT,
        )
        and not reason
    ):
        raise Invalid(f"{req.action} needs a reason", code="reason_required")
    if req.action is Action.RESUBMIT_CORRECTED and not (req.corrected_payload or "").strip():
        raise Invalid("resubmit_corrected needs the edited payload", code="payload_required")


def plan_transition(facts: ExceptionFacts, req: DecisionRequest) -> ExceptionState:
    """Return the state the exception moves to, or raise.

    Order of checks: role (403), content (422), state (409), four-eyes (403).
    """
    rule = RULES[req.action]
    if req.actor_role not in rule.roles:
        raise Forbidden(f"role {req.actor_role} may not {req.action}", code="role_forbidden")
    validate_request(req)
    if facts.state not in rule.from_states:
        raise Conflict(f"cannot {req.action} an exception in state {facts.state}", code="state_conflict")
    if req.action in (Action.RESUBMIT, Action.RESUBMIT_CORRECTED) and facts.needs_not_applied_confirmation:
        raise Conflict(
            "the last attempt has an unknown outcome and this connection cannot search the EHR: "
            "a clinical lead must record confirm_not_applied first",
            code="needs_confirm_not_applied",
        )
    if req.action is Action.CONFIRM_NOT_APPLIED and not facts.needs_not_applied_confirmation:
        raise Conflict(
            "nothing to confirm: this exception does not await confirmation", code="state_conflict"
        )
    if req.action is Action.APPROVE:
        if facts.replay_requested_by is not None and facts.replay_requested_by == req.actor_id:
            raise Forbidden("four-eyes: you cannot approve your own replay request", code="self_approval")
        if req.actor_id in facts.replay_edited_by:
            raise Forbidden("four-eyes: you edited the payload of this replay", code="self_approval")
        parties = facts.replay_edited_by | (
            {facts.replay_requested_by} if facts.replay_requested_by is not None else set()
        )
        if req.actor_id in facts.replay_parties_enrolled_by:
            raise Forbidden(
                "four-eyes: you created the account that requested or edited this replay",
                code="enrolment_conflict",
            )
        if req.actor_enrolled_by & parties:
            raise Forbidden(
                "four-eyes: your account was created or enrolled by the person who requested or "
                "edited this replay",
                code="enrolment_conflict",
            )
        if req.actor_enrolled_by & facts.replay_parties_enrolled_by:
            # one admin held the enrollment links of both accounts: the product cannot tell
            # that two people are behind them
            raise Forbidden(
                "four-eyes: your account and the requester's (or editor's) were enrolled by the "
                "same administrator; another clinical lead must approve",
                code="enrolment_conflict",
            )
        if req.approvals_locked:
            raise Forbidden(
                "your approvals are locked after 5 wrong approval passwords in 15 minutes; "
                "ask an administrator to clear the lock",
                code="approval_locked",
            )
        if not req.password_confirmed:
            raise Forbidden(password_refusal(req.password_given), code="password_required")
    return rule.to_state if rule.to_state is not None else facts.state


# --- the system's own transitions ----------------------------------------------------------------
# Who moves what without a person: (from, to) → the component and why. A human decision moves an
# exception (and its replay) through RULES above; these are the rest. A move of a state the
# product stores that is in neither table is a bug, and `check_transition` says so.

_E, _R, _T, _M = ExceptionState, ReplayState, AttemptState, MessageState
_RESULTS = (_T.DELIVERED, _T.REJECTED, _T.TRANSIENT, _T.UNKNOWN)

SYSTEM_TRANSITIONS: dict[StateKind, dict[tuple[StrEnum, StrEnum], str]] = {
    StateKind.EXCEPTION: {
        (_E.RETRYING, _E.RETRYING): "retry: next retry scheduled (or a held item waits)",
        (_E.RETRYING, _E.RESOLVED): "retry: an automatic retry delivered",
        (_E.RETRYING, _E.OPEN): "retry: retries exhausted, or the attempt's worker was lost",
        (_E.REPLAYING, _E.RESOLVED): "worker: the replay delivered or found it already applied",
        (_E.REPLAYING, _E.OPEN): "worker: the replay failed, or its lease expired",
        (_E.OPEN, _E.ESCALATED): "sla: breached, escalated to the clinical leads",
        (_E.OPEN, _E.RESOLVED): "worker: a late result proved delivery",
        (_E.ESCALATED, _E.RESOLVED): "worker: a late result proved delivery",
        (_E.PENDING_APPROVAL, _E.REPLAYING): "bulk replay: an approved batch releases the item in its slot",
        (_E.PENDING_APPROVAL, _E.OPEN): "bulk replay: cancelled or paused-and-cancelled before release",
    },
    StateKind.REPLAY: {
        (_R.QUEUED, _R.QUEUED): "worker: deferred until an earlier request's window closes",
        (_R.QUEUED, _R.RUNNING): "worker: claimed, with a lease",
        (_R.RUNNING, _R.RUNNING): "worker: lease renewed",
        (_R.RUNNING, _R.SUCCEEDED): "worker: delivered or found already applied",
        (_R.RUNNING, _R.FAILED): "worker: the EHR refused it or the call failed",
        (_R.RUNNING, _R.LOST): "reaper: the lease expired",
    },
    StateKind.ATTEMPT: {
        (_T.QUEUED, _T.IN_FLIGHT): "worker: claimed, with a lease",
        (_T.IN_FLIGHT, _T.IN_FLIGHT): "worker: lease renewed",
        **{(_T.IN_FLIGHT, to): "worker: the adapter's result" for to in _RESULTS},
        # the reaper declared it lost (unknown) first; the worker's late result is kept as evidence
        **{(_T.UNKNOWN, to): "worker: a late result after the lease expired" for to in _RESULTS},
    },
    StateKind.MESSAGE: {
        (_M.QUEUED, _M.DELIVERING): "worker: first delivery claimed",
        (_M.EXCEPTION, _M.DELIVERING): "worker: an automatic retry claimed",
        (_M.DELIVERING, _M.DELIVERED): "worker: delivered",
        (_M.DELIVERING, _M.EXCEPTION): "worker: failed, or its worker was lost",
        (_M.EXCEPTION, _M.DELIVERED): "worker: a retry, replay or late result delivered",
        (_M.EXCEPTION, _M.EXCEPTION): "worker: another failure",
        (_M.QUEUED, _M.EXCEPTION): "intake / reaper: refused before sending, or its worker was lost",
    },
}

# Human decisions that move replays and messages (through `decide`), beside RULES.
HUMAN_TRANSITIONS: dict[StateKind, dict[tuple[StrEnum, StrEnum], Action]] = {
    StateKind.EXCEPTION: {
        (from_state, rule.to_state or from_state): action  # None: unchanged (comment, assign, claim)
        for action, rule in RULES.items()
        for from_state in rule.from_states
    },
    StateKind.REPLAY: {
        (_R.PENDING_APPROVAL, _R.QUEUED): Action.APPROVE,
        (_R.PENDING_APPROVAL, _R.REJECTED): Action.REJECT,
    },
    StateKind.ATTEMPT: {},
    StateKind.MESSAGE: {(_M.EXCEPTION, _M.DISCARDED): Action.DISCARD},
}


class IllegalTransition(Conflict):
    """A move the state tables do not allow (a bug in the caller, never a race)."""

    code = "illegal_transition"


def check_transition(kind: StateKind | str, from_state: str, to_state: str) -> None:
    """Raise IllegalTransition unless (from → to) is a system or human transition of `kind`.

    Pure; unknown state names raise too. The compare-and-set helper calls it for every update that
    names both the expected and the new state."""
    kind = StateKind(kind)
    states = STATE_TYPES[kind]
    try:
        pair = (states(from_state), states(to_state))
    except ValueError:
        raise IllegalTransition(f"unknown {kind} state in {from_state!r} -> {to_state!r}") from None
    if pair not in SYSTEM_TRANSITIONS[kind] and pair not in HUMAN_TRANSITIONS[kind]:
        raise IllegalTransition(f"{kind} cannot move from {from_state} to {to_state}")
