"""Exceptions: opening them, human decisions (SPEC 3.1) and audited payload views.

Every decision is a compare-and-set on (state, version); the decision row, its
audit event and any outbox row commit in the caller's single transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.active import state_in
from app.db.cas import cas_update
from app.db.models import Decision, ExceptionItem, Message, OutboxEntry, PayloadVersion, Replay, User
from app.domain.delivery import Category
from app.domain.errors import Conflict, Forbidden, Invalid, NotFound
from app.domain.payloads import decode_payload, encode_text
from app.domain.roles import Role
from app.domain.states import (
    Action,
    DecisionRequest,
    ExceptionFacts,
    ExceptionState,
    MessageState,
    ReplayState,
    parse_action,
    plan_transition,
)

from . import audit, connections, ordering, phi
from .clock import utcnow
from .users import check_password


def open_exception(
    session: so.Session,
    message: Message,
    category: Category | str,
    detail: str,
    *,
    payload_version_id: int | None = None,
    state: ExceptionState = ExceptionState.OPEN,
    next_retry_at: datetime | None = None,
    actor: str = "system:intake",
    may_have_applied: bool | None = None,
) -> ExceptionItem:
    """Put a message in a queue, with an SLA timer from the runtime policy.

    may_have_applied: the last attempt may have reached and changed the EHR (default: only
    for unknown_outcome). On a connection that cannot search, such an item needs a clinical
    lead's confirm_not_applied before anyone can resubmit it.
    """
    now = utcnow()
    conn = message.connection
    category = Category(category)
    due = connections.sla_policy(session).due_at(now, category, message.clinical_risk, conn.customer_id)
    item = ExceptionItem(
        message_id=message.id,
        connection_id=conn.id,
        customer_id=conn.customer_id,
        message_type=message.message_type,
        category=category.value,
        state=state.value,
        version=1,
        detail=detail[:4000],
        sla_started_at=now,
        sla_due_at=due,
        needs_not_applied_confirmation=_needs_confirmation(conn, category, may_have_applied),
        next_retry_at=next_retry_at,
        created_at=now,
        updated_at=now,
    )
    session.add(item)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="exception.open",
        subject_type="exception",
        subject_id=item.id,
        to_state=item.state,
        reason=detail[:500],
        details={"category": item.category, "message_id": message.id, "sla_due_at": due.isoformat() + "Z"},
    )
    return item


def _needs_confirmation(conn, category: Category, may_have_applied: bool | None) -> bool:
    if may_have_applied is None:
        may_have_applied = category is Category.UNKNOWN_OUTCOME
    return may_have_applied and not conn.supports_identifier_search


def reopen(
    session: so.Session,
    item: ExceptionItem,
    category: Category | str,
    detail: str,
    *,
    from_state: str,
    actor: str,
    may_have_applied: bool | None = None,
) -> bool:
    """System move back to a human queue (replay failed, retries exhausted, lease expired).

    A new category restarts the SLA timer. Returns False when someone else moved it first.
    """
    now = utcnow()
    category = Category(category)
    conn = item.connection
    due = connections.sla_policy(session).due_at(now, category, item.message.clinical_risk, conn.customer_id)
    values = dict(
        state=ExceptionState.OPEN.value,
        category=category.value,
        detail=detail[:4000],
        version=ExceptionItem.version + 1,
        updated_at=now,
        next_retry_at=None,
        sla_started_at=now,
        sla_due_at=due,
        needs_not_applied_confirmation=_needs_confirmation(conn, category, may_have_applied),
    )
    if not _compare_and_set(session, item, from_state, values):
        return False
    audit.record(
        session,
        actor=actor,
        action="exception.reopen",
        subject_type="exception",
        subject_id=item.id,
        from_state=from_state,
        to_state=ExceptionState.OPEN.value,
        reason=detail[:500],
        details={"category": category.value, "sla_due_at": due.isoformat() + "Z"},
    )
    return True


def escalate_breached(session: so.Session, *, limit: int = 200) -> int:
    """SPEC 3.3: an open item whose SLA has passed is escalated to the clinical leads, once,
    by the system (a decision and an audit event, like a reviewer's escalation)."""
    now = utcnow()
    # One range of ix_exceptions_active_state (state, sla_due_at, id), over active rows only.
    open_state = state_in(ExceptionItem.state, [ExceptionState.OPEN.value], session.get_bind().dialect.name)
    breached = session.scalars(
        sa.select(ExceptionItem)
        .where(open_state, ExceptionItem.sla_due_at <= now)
        .order_by(ExceptionItem.sla_due_at, ExceptionItem.id)
        .limit(limit)
    ).all()
    escalated = 0
    for item in breached:
        values = {"state": ExceptionState.ESCALATED.value, "version": item.version + 1, "updated_at": now}
        if not _compare_and_set(session, item, ExceptionState.OPEN.value, values, version=item.version):
            continue  # someone acted on it meanwhile
        reason = f"SLA breached at {item.sla_due_at:%Y-%m-%d %H:%M} UTC"
        decision = Decision(
            exception_id=item.id,
            actor_id=None,
            actor="system:sla",
            action=Action.ESCALATE.value,
            reason=reason,
            from_state=ExceptionState.OPEN.value,
            to_state=ExceptionState.ESCALATED.value,
            details={},
            created_at=now,
        )
        session.add(decision)
        session.flush()
        audit.record(
            session,
            actor="system:sla",
            action="decision.escalate",
            subject_type="exception",
            subject_id=item.id,
            from_state=ExceptionState.OPEN.value,
            to_state=ExceptionState.ESCALATED.value,
            reason=reason,
            details={"decision_id": decision.id, "sla_due_at": item.sla_due_at.isoformat() + "Z"},
        )
        escalated += 1
    return escalated


def _compare_and_set(
    session: so.Session, item: ExceptionItem, from_state: str, values: dict, version: int | None = None
) -> bool:
    """The exception's compare-and-set on its state [and version] (app/db/cas.py)."""
    expect = {"state": from_state} if version is None else {"state": from_state, "version": version}
    return cas_update(session, ExceptionItem, item.id, expect=expect, values=values, refresh=item)


def get(session: so.Session, exception_id: int) -> ExceptionItem:
    item = session.get(ExceptionItem, exception_id)
    if item is None:
        raise NotFound(f"exception {exception_id} not found")
    return item


def pending_replay(session: so.Session, item: ExceptionItem) -> Replay | None:
    return session.scalar(
        sa.select(Replay).where(Replay.exception_id == item.id, Replay.state == ReplayState.PENDING_APPROVAL)
    )


@dataclass
class DecisionInput:
    action: str
    reason: str = ""
    reason_code: str | None = None
    payload: str | None = None
    password: str | None = None
    assignee: str | None = None
    expected_version: int | None = None


class ApprovalPasswordFailed(Forbidden):
    """A wrong approval password: 403, and recorded (audited, counted) after the rollback."""

    def __init__(self, message: str, *, user_id: int, exception_id: int):
        super().__init__(message, code="password_required")
        self.user_id = user_id
        self.exception_id = exception_id


def _replay_people(session: so.Session, replay) -> tuple[set[int], set[int]]:
    """(accounts that created a payload version of the replay's message, accounts that
    created/enrolled the requester's or those editors' accounts)."""
    if replay is None:
        return set(), set()
    edited = set(
        session.scalars(
            sa.select(PayloadVersion.created_by_id).where(
                PayloadVersion.message_id == replay.message_id,
                PayloadVersion.created_by_id.is_not(None),
                PayloadVersion.version > 1,  # version 1 is what intake received from the sender
            )
        )
    )
    parties = edited | {replay.requested_by_id}
    enrolled: set[int] = set()
    for created_by, enrolled_by in session.execute(
        sa.select(User.created_by_id, User.enrolled_by_id).where(User.id.in_(parties))
    ):
        enrolled.update(i for i in (created_by, enrolled_by) if i is not None)
    return edited, enrolled


def decide(session: so.Session, exception_id: int, actor: User, data: DecisionInput) -> Decision:
    """Apply one human decision. Raises Forbidden (403), Conflict (409), Invalid (422), NotFound."""
    action = parse_action(data.action)
    item = get(session, exception_id)
    replay = pending_replay(session, item)
    reason_code = data.reason_code or None
    req = DecisionRequest(
        action=action,
        actor_id=actor.id,
        actor_role=Role(actor.role),
        reason=(data.reason or "").strip(),
        reason_code=reason_code,
        corrected_payload=data.payload,
        password_confirmed=action is Action.APPROVE
        and actor.approval_locked_at is None
        and check_password(actor, data.password or ""),
        password_given=bool(data.password),
        actor_enrolled_by=frozenset(i for i in (actor.created_by_id, actor.enrolled_by_id) if i is not None),
        approvals_locked=actor.approval_locked_at is not None,
    )
    edited_by, enrolled_by = _replay_people(session, replay) if action is Action.APPROVE else ((), ())
    facts = ExceptionFacts(
        state=ExceptionState(item.state),
        category=item.category,
        needs_not_applied_confirmation=item.needs_not_applied_confirmation,
        replay_requested_by=replay.requested_by_id if replay else None,
        replay_edited_by=frozenset(edited_by),
        replay_parties_enrolled_by=frozenset(enrolled_by),
    )
    try:
        to_state = plan_transition(facts, req)
    except Forbidden as exc:
        if exc.code == "password_required":
            # The caller's transaction rolls back; unit_of_work records the failure afterwards
            # in its own transaction (users.record_approval_password_failure).
            raise ApprovalPasswordFailed(exc.message, user_id=actor.id, exception_id=exception_id) from None
        raise
    if data.expected_version is not None and data.expected_version != item.version:
        raise Conflict(
            "this exception changed since you loaded it; reload and try again", code="version_conflict"
        )

    from_state = item.state
    now = utcnow()
    values: dict = {"state": to_state.value, "version": item.version + 1, "updated_at": now}
    details: dict = {}
    assignee = None
    new_payload = None

    if action is Action.RESUBMIT_CORRECTED:
        new_payload = _new_payload_version(session, item.message, data.payload or "", actor, req.reason)
    if action in (Action.ASSIGN, Action.CLAIM):
        assignee = actor if action is Action.CLAIM else _assignee(session, data.assignee)
        values["assignee_id"] = assignee.id
        details["assignee"] = assignee.username
    if action is Action.CONFIRM_NOT_APPLIED:
        values["needs_not_applied_confirmation"] = False
    if to_state in (ExceptionState.DISCARDED,):
        values["resolved_at"] = now

    if not _compare_and_set(session, item, from_state, values, version=item.version):
        raise Conflict(
            "someone else acted on this exception first; reload to see its new state", code="state_conflict"
        )

    if action in (Action.RESUBMIT, Action.RESUBMIT_CORRECTED):
        payload_id = new_payload.id if new_payload else item.message.current_payload_id
        replay = Replay(
            exception_id=item.id,
            message_id=item.message_id,
            payload_version_id=payload_id,
            state=ReplayState.PENDING_APPROVAL,
            corrected=new_payload is not None,
            requested_by_id=actor.id,
            requested_at=now,
            request_reason=req.reason,
        )
        session.add(replay)
        session.flush()
        details.update(replay_id=replay.id, payload_version_id=payload_id)
        if new_payload is not None:
            details["payload_sha256"] = new_payload.sha256
    elif action is Action.APPROVE:
        _replay_cas(
            session,
            replay,
            ReplayState.PENDING_APPROVAL,
            state=ReplayState.QUEUED,
            approved_by_id=actor.id,
            approved_at=now,
        )
        session.add(
            OutboxEntry(kind="replay", ref_id=str(replay.id), job_id=f"replay-{replay.id}", created_at=now)
        )
        details.update(replay_id=replay.id, requested_by=replay.requested_by.username)
    elif action is Action.REJECT:
        _replay_cas(
            session,
            replay,
            ReplayState.PENDING_APPROVAL,
            state=ReplayState.REJECTED,
            rejected_by_id=actor.id,
            finished_at=now,
            result=req.reason,
        )
        details["replay_id"] = replay.id
    elif action is Action.DISCARD:
        item.message.status = MessageState.DISCARDED
        item.message.updated_at = now
        # a later message of the same patient waiting behind this one goes now (ordering)
        ordering.release_waiting(session, item.message_id)

    decision = Decision(
        exception_id=item.id,
        actor_id=actor.id,
        actor=actor.username,
        action=action.value,
        reason=req.reason,
        reason_code=reason_code,
        from_state=from_state,
        to_state=to_state.value,
        details=details,
        created_at=now,
    )
    session.add(decision)
    session.flush()
    details["decision_id"] = decision.id
    audit.record(
        session,
        actor=actor.username,
        action=f"decision.{action.value}",
        subject_type="exception",
        subject_id=item.id,
        from_state=from_state,
        to_state=to_state.value,
        reason=req.reason or None,
        reason_code=reason_code,
        details=details,
    )
    return decision


def _replay_cas(session: so.Session, replay: Replay | None, from_state: ReplayState, **values) -> None:
    if replay is None:
        raise Conflict("there is no pending replay request", code="state_conflict")
    if not cas_update(
        session, Replay, replay.id, expect={"state": from_state}, values=values, refresh=replay
    ):
        raise Conflict("the replay request changed underneath", code="state_conflict")


def _assignee(session: so.Session, username: str | None) -> User:
    if not username:
        raise Invalid("assign needs an assignee", code="assignee_required")
    user = session.scalar(sa.select(User).where(User.username == username))
    if user is None or user.role not in (Role.REVIEWER, Role.CLINICAL_LEAD) or not user.active:
        raise Invalid(f"{username!r} is not an active reviewer or clinical lead", code="invalid_assignee")
    return user


def _new_payload_version(
    session: so.Session, message: Message, text: str, actor: User, reason: str
) -> PayloadVersion:
    """A corrected payload is a new version; the original bytes are never overwritten."""
    decoded = decode_payload(
        encode_text(text, message.content_type),
        message.content_type,
        message.message_type,
        diagnosis_code_system=message.connection.diagnosis_code_system or "icd-10",
    )
    problem = decoded.problem or decoded.code_set_problem
    if problem:
        raise Invalid(f"the corrected payload cannot be used: {problem}", code="invalid_payload")
    latest = (
        session.scalar(
            sa.select(sa.func.max(PayloadVersion.version)).where(PayloadVersion.message_id == message.id)
        )
        or 0
    )
    version = PayloadVersion(
        message_id=message.id,
        version=latest + 1,
        raw=decoded.raw,
        text=decoded.text,
        encoding=decoded.encoding,
        sha256=decoded.sha256,
        created_by_id=actor.id,
        reason=reason,
        created_at=utcnow(),
    )
    session.add(version)
    session.flush()
    return version


def view_payload(
    session: so.Session,
    item: ExceptionItem,
    actor: User,
    *,
    channel: str,
    payload_version_id: int | None = None,
) -> PayloadVersion:
    """Reading a full payload is an audited PHI view (SPEC 3.4; app/services/phi.py, de-duplicated
    per user, exception and payload version). Default: the current version."""
    payload = session.get(PayloadVersion, payload_version_id or item.message.current_payload_id)
    if payload is not None and payload.purged_at is None:  # a purged version shows no content
        phi.record_phi_view(session, actor, item, payload.version, channel=channel)
    return payload
