"""Approvals as a work queue (issue 8): the clinical lead's list of replays waiting for a second
person, one review at a time, and what the console must say when someone else decided first.

Reads only, but for `review`, which the caller pairs with the audited PHI view of the proposed
payload (exceptions.view_payload) when it shows payload content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import Connection, Customer, Decision, ExceptionItem, PayloadVersion, Replay, User
from app.domain.errors import DomainError, Forbidden
from app.domain.roles import Role
from app.domain.states import Action, DecisionRequest, ExceptionFacts, ExceptionState, plan_transition

from . import exceptions
from .clock import utcnow

SORTS = ("sla", "age")  # SLA due first (default) | oldest request first
QUEUE_LIMIT = 200


@dataclass(frozen=True)
class ApprovalFilters:
    """What the list shows, from the query string (so a filtered view is a link)."""

    customer: str = ""
    connection: str = ""
    category: str = ""
    sort: str = "sla"

    @classmethod
    def from_args(cls, args) -> ApprovalFilters:
        sort = args.get("sort", "sla")
        return cls(
            customer=(args.get("customer") or "")[:120],
            connection=(args.get("connection") or "")[:120],
            category=(args.get("category") or "")[:30],
            sort=sort if sort in SORTS else "sla",
        )

    def as_args(self) -> dict[str, str]:
        """Non-default values only: what a link back to this view carries."""
        args = {"customer": self.customer, "connection": self.connection, "category": self.category}
        if self.sort != "sla":
            args["sort"] = self.sort
        return {k: v for k, v in args.items() if v}


@dataclass
class QueueRow:
    replay: Replay
    item: ExceptionItem


@dataclass
class ApprovalQueue:
    rows: list[QueueRow]
    total_waiting: int  # every pending approval, whatever the filter
    customers: list[str] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [r.item.id for r in self.rows]


def _pending():
    return (
        sa.select(Replay, ExceptionItem)
        .join(ExceptionItem, ExceptionItem.id == Replay.exception_id)
        .where(
            Replay.state == "pending_approval", ExceptionItem.state == ExceptionState.PENDING_APPROVAL.value
        )
    )


def approval_queue(
    session: so.Session, filters: ApprovalFilters, *, limit: int = QUEUE_LIMIT
) -> ApprovalQueue:
    """Replays waiting for a clinical lead, filtered and sorted; no payload is read."""
    stmt = _pending().options(
        so.selectinload(Replay.requested_by),
        so.selectinload(ExceptionItem.customer),
        so.selectinload(ExceptionItem.connection),
    )
    if filters.customer:
        stmt = stmt.join(Customer, Customer.id == ExceptionItem.customer_id).where(
            Customer.name == filters.customer
        )
    if filters.connection:
        stmt = stmt.join(Connection, Connection.id == ExceptionItem.connection_id).where(
            Connection.name == filters.connection
        )
    if filters.category:
        stmt = stmt.where(ExceptionItem.category == filters.category)
    if filters.sort == "age":
        stmt = stmt.order_by(Replay.requested_at, Replay.id)
    else:
        stmt = stmt.order_by(ExceptionItem.sla_due_at, ExceptionItem.id)
    rows = [QueueRow(replay, item) for replay, item in session.execute(stmt.limit(limit))]
    facets = session.execute(
        sa.select(Customer.name, Connection.name, ExceptionItem.category)
        .select_from(Replay)
        .join(ExceptionItem, ExceptionItem.id == Replay.exception_id)
        .join(Customer, Customer.id == ExceptionItem.customer_id)
        .join(Connection, Connection.id == ExceptionItem.connection_id)
        .where(
            Replay.state == "pending_approval", ExceptionItem.state == ExceptionState.PENDING_APPROVAL.value
        )
    ).all()
    return ApprovalQueue(
        rows=rows,
        total_waiting=len(facets),
        customers=sorted({f[0] for f in facets}),
        connections=sorted({f[1] for f in facets}),
        categories=sorted({f[2] for f in facets}),
    )


def next_item(before: list[int], after: list[int], current: int) -> int | None:
    """The item to review after `current` was decided: the first one that followed it in the list
    the lead was working through and is still waiting, else the first still waiting."""
    remaining = [i for i in after if i != current]
    if not remaining:
        return None
    if current in before:
        still = set(remaining)
        for item_id in before[before.index(current) + 1 :]:
            if item_id in still:
                return item_id
    return remaining[0]


@dataclass
class Review:
    """One item's review panel."""

    item: ExceptionItem
    replay: Replay | None  # the pending replay; None when it was decided meanwhile
    original: PayloadVersion | None
    proposed: PayloadVersion | None
    last_decision: Decision | None
    approve_refusal: str | None  # why this lead may not approve it (shown instead of the button)


def review(session: so.Session, exception_id: int, actor: User) -> Review:
    """The item, its pending replay (if still pending), both payload versions and, when this lead
    may not approve it, why — decided by the same rules as the approval itself."""
    item = exceptions.get(session, exception_id)
    replay = exceptions.pending_replay(session, item)
    original = proposed = None
    if replay is not None and replay.corrected:
        proposed = replay.payload_version
        original = session.scalar(
            sa.select(PayloadVersion).where(
                PayloadVersion.message_id == replay.message_id, PayloadVersion.version == 1
            )
        )
    refusal = approve_refusal(session, item, replay, actor) if replay is not None else None
    # What the panel shows, loaded now: it is rendered after the transaction ends.
    _ = item.message, item.connection, item.customer, replay and replay.requested_by
    return Review(item, replay, original, proposed, last_decision(session, exception_id), refusal)


def approve_refusal(session: so.Session, item: ExceptionItem, replay: Replay, actor: User) -> str | None:
    """Why `actor` cannot approve this replay whatever password they type (four-eyes, the people
    rules, a locked approval password), or None. The same plan_transition the decision runs."""
    user = session.get(User, actor.id)  # the lock may have been set during this request
    edited, enrolled = exceptions._replay_people(session, replay)
    facts = ExceptionFacts(
        state=ExceptionState(item.state),
        category=item.category,
        replay_requested_by=replay.requested_by_id,
        replay_edited_by=frozenset(edited),
        replay_parties_enrolled_by=frozenset(enrolled),
    )
    req = DecisionRequest(
        action=Action.APPROVE,
        actor_id=user.id,
        actor_role=Role(user.role),
        password_confirmed=True,
        actor_enrolled_by=frozenset(i for i in (user.created_by_id, user.enrolled_by_id) if i is not None),
        approvals_locked=user.approval_locked_at is not None,
    )
    try:
        plan_transition(facts, req)
    except Forbidden as exc:
        return exc.message
    except DomainError:
        return None  # a state conflict surfaces when the decision is tried
    return None


def last_decision(session: so.Session, exception_id: int) -> Decision | None:
    """The newest human decision on an exception: who decided, what and when (for a 409)."""
    return session.scalar(
        sa.select(Decision)
        .where(Decision.exception_id == exception_id)
        .order_by(Decision.created_at.desc(), Decision.id.desc())
        .limit(1)
    )


def decided_by(decision: Decision | None) -> str | None:
    """'approved by leo at 10:42 UTC' for a 409 message, from the stored decision."""
    if decision is None:
        return None
    verb = {
        "approve": "approved",
        "reject": "rejected",
        "discard": "discarded",
        "resubmit": "resubmitted",
        "resubmit_corrected": "resubmitted with a correction",
        "escalate": "escalated",
        "confirm_not_applied": "confirmed not applied",
        "comment": "commented on",
        "assign": "assigned",
        "claim": "claimed",
    }.get(decision.action, decision.action.replace("_", " "))
    return f"{verb} by {decision.actor} at {_at(decision.created_at)}"


def _at(value: datetime) -> str:
    same_day = value.date() == utcnow().date()
    return value.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC")
