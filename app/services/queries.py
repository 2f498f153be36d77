"""Read side for the console and the API: listings, aggregates and detail bundles.

Nothing here writes. Every listing is ordered by an indexed key and paginated by keyset
(never OFFSET), and related rows are loaded with joinedload/selectinload so a page costs a
fixed number of queries however many rows it shows.

The queue order is (sla_due_at, id). A category queue (state = open AND category = X) and a
cursor position within it are one range of `ix_exceptions_queue (state, category, sla_due_at,
id)`, read in order; listings over several states use the same index to narrow to active rows
(a small set next to the resolved history) and sort those. `ix_exceptions_sla (sla_due_at, id)`
serves unfiltered scans.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import (
    ApiToken,
    Attempt,
    AuditEvent,
    Connection,
    Customer,
    Decision,
    ExceptionItem,
    Message,
    MessageIdentifier,
    PayloadVersion,
    Replay,
    SlaRuleRow,
    User,
)
from app.domain.audit_chain import format_timestamp
from app.domain.delivery import Category
from app.domain.errors import Invalid, NotFound
from app.domain.identifiers import search_values
from app.domain.payloads import PROPOSED_REPAIR
from app.domain.roles import Role
from app.domain.sla import AT_RISK_FRACTION, SlaStatus
from app.domain.states import FINAL_STATES, ExceptionState

from . import connections
from .clock import utcnow

ACTIVE_STATES = tuple(s.value for s in ExceptionState if s not in FINAL_STATES)
ALL_STATES = tuple(s.value for s in ExceptionState)
CATEGORIES = tuple(c.value for c in Category)
SLA_STATUSES = tuple(s.value for s in SlaStatus)
DEFAULT_PAGE = 50
MAX_PAGE = 500  # the API allows up to 500 per page
UNASSIGNED = "-"  # assignee filter value meaning "nobody"
MIN_PREFIX = 4  # free-text prefix searches need at least this many characters

# Replay states in which a worker still has (or is about to have) the replay.
RUNNING_REPLAY_STATES = ("queued", "running")

# Named queues (SPEC 5 "one per category plus escalated and awaiting approval").
SPECIAL_QUEUES = ("all", "escalated", "awaiting_approval")
QUEUES = (*SPECIAL_QUEUES, *CATEGORIES)


# --- cursors --------------------------------------------------------------------------------------


def encode_cursor(sla_due_at: datetime, item_id: int) -> str:
    """Opaque keyset cursor for the position after (sla_due_at, id)."""
    raw = json.dumps([sla_due_at.isoformat(), item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """Inverse of encode_cursor; Invalid (422) for anything we did not issue."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        due, item_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        item_id = int(item_id)
        if not 0 <= item_id < 2**63:
            raise ValueError("id out of range")
        return datetime.fromisoformat(due), item_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise Invalid("invalid cursor", code="invalid_cursor") from None


# --- SLA status in SQL ----------------------------------------------------------------------------


def _epoch(session: so.Session, value: Any) -> sa.ColumnElement:
    """A number that grows linearly with time, in whatever unit the dialect offers.

    Only differences and linear combinations of these are compared, so the unit cancels out.
    """
    if session.get_bind().dialect.name == "sqlite":
        return sa.func.julianday(value)
    return sa.extract("epoch", value)


def _sla_condition(session: so.Session, status: str, now: datetime) -> sa.ColumnElement[bool]:
    """SQL for app.domain.sla.sla_status(now, started, due) == status.

    at risk: due - now < F * (due - started)  <=>  (1-F)*due + F*started < now.
    """
    due = ExceptionItem.sla_due_at
    if status == SlaStatus.BREACHED:
        return due <= now
    now_e = _epoch(session, sa.literal(now, sa.DateTime()))
    weighted = (1 - AT_RISK_FRACTION) * _epoch(session, due) + AT_RISK_FRACTION * _epoch(
        session, ExceptionItem.sla_started_at
    )
    at_risk = sa.or_(weighted < now_e, due <= ExceptionItem.sla_started_at)
    if status == SlaStatus.AT_RISK:
        return sa.and_(due > now, at_risk)
    if status == SlaStatus.ON_TRACK:
        return sa.and_(due > now, sa.not_(at_risk))
    raise Invalid(f"unknown SLA status {status!r}", code="invalid_filter")


def _sla_case(session: so.Session, now: datetime) -> sa.Case:
    return sa.case(
        (_sla_condition(session, SlaStatus.BREACHED, now), SlaStatus.BREACHED.value),
        (_sla_condition(session, SlaStatus.AT_RISK, now), SlaStatus.AT_RISK.value),
        else_=SlaStatus.ON_TRACK.value,
    )


# --- exception listings ---------------------------------------------------------------------------


def _as_values(value: str | Iterable[str] | None, allowed: tuple[str, ...], what: str) -> list[str]:
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, str) else [v for v in value if v]
    for v in values:
        if v not in allowed:
            raise Invalid(f"unknown {what} {v!r}", code="invalid_filter")
    return values


def _id_like(text: str) -> bool:
    """Plain ASCII digits that fit a database integer."""
    return text.isdecimal() and text.isascii() and len(text) <= 18


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(
    session: so.Session,
    stmt: sa.Select,
    *,
    state: str | Iterable[str] | None,
    category: str | Iterable[str] | None,
    connection: str | None,
    customer: str | None,
    message_type: str | None,
    sla_status: str | None,
    assignee: str | None,
    q: str | None,
    now: datetime,
) -> sa.Select:
    states = _as_values(state, ALL_STATES, "state")
    if states:
        stmt = stmt.where(ExceptionItem.state.in_(states))
    categories = _as_values(category, CATEGORIES, "category")
    if categories:
        stmt = stmt.where(ExceptionItem.category.in_(categories))
    if connection:
        # Scalar subqueries keep the queue query on the exceptions indexes (no join to sort through).
        stmt = stmt.where(
            ExceptionItem.connection_id
            == sa.select(Connection.id).where(Connection.name == connection).scalar_subquery()
        )
    if customer:
        stmt = stmt.where(
            ExceptionItem.customer_id
            == sa.select(Customer.id).where(Customer.name == customer).scalar_subquery()
        )
    if message_type:
        stmt = stmt.where(ExceptionItem.message_type == message_type)
    if sla_status:
        stmt = stmt.where(_sla_condition(session, sla_status, now))
    if assignee == UNASSIGNED:
        stmt = stmt.where(ExceptionItem.assignee_id.is_(None))
    elif assignee:
        stmt = stmt.where(
            ExceptionItem.assignee_id == sa.select(User.id).where(User.username == assignee).scalar_subquery()
        )
    text = (q or "").strip()
    if text.startswith("#") and _id_like(text[1:]):
        stmt = stmt.where(ExceptionItem.id == int(text[1:]))
    elif text:
        exact = [
            Message.control_id == text,
            Message.control_id == text.upper(),
            Message.idempotency_key == text,
        ]
        if len(text) >= MIN_PREFIX:
            # Prefixes (of a UUID or a key) only from a few characters on: "1" is not a search.
            prefix = _escape_like(text) + "%"
            exact += [Message.id.like(prefix, escape="\\"), Message.idempotency_key.like(prefix, escape="\\")]
        conditions = [
            ExceptionItem.message_id.in_(sa.select(Message.id).where(sa.or_(*exact))),
            # Patient and order identifiers the message carries: `Patient/123456`, an MRN, ORC-2.
            ExceptionItem.message_id.in_(
                sa.select(MessageIdentifier.message_id).where(
                    MessageIdentifier.value.in_(search_values(text))
                )
            ),
        ]
        if _id_like(text):
            conditions.append(ExceptionItem.id == int(text))
        stmt = stmt.where(sa.or_(*conditions))
    return stmt


def list_exceptions(
    session: so.Session,
    *,
    state: str | Iterable[str] | None = None,
    category: str | Iterable[str] | None = None,
    connection: str | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
    customer: str | None = None,
    message_type: str | None = None,
    sla_status: str | None = None,
    assignee: str | None = None,
    q: str | None = None,
    now: datetime | None = None,
) -> tuple[list[ExceptionItem], str | None]:
    """One page of exceptions ordered by SLA due time, and the cursor of the next page (or None).

    Filters: `state`/`category` (a value or several), `connection`/`customer` by name,
    `message_type`, `sla_status` (on_track/at_risk/breached), `assignee` (username, or
    UNASSIGNED), `q` (message id prefix, control id, idempotency key, or exception id).
    Items come with message, connection, customer and assignee loaded; pass each to
    `exception_summary` for the API shape. Raises Invalid for unknown filter values or cursors.
    """
    now = now or utcnow()
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = _filtered(
        session,
        sa.select(ExceptionItem),
        state=state,
        category=category,
        connection=connection,
        customer=customer,
        message_type=message_type,
        sla_status=sla_status,
        assignee=assignee,
        q=q,
        now=now,
    )
    if cursor:
        due, last_id = decode_cursor(cursor)
        # The redundant `>=` lets the planner range-scan (sla_due_at, id) from the cursor.
        stmt = stmt.where(
            ExceptionItem.sla_due_at >= due,
            sa.or_(ExceptionItem.sla_due_at > due, ExceptionItem.id > last_id),
        )
    stmt = (
        stmt.options(
            so.joinedload(ExceptionItem.message),
            so.joinedload(ExceptionItem.connection),
            so.joinedload(ExceptionItem.customer),
            so.joinedload(ExceptionItem.assignee),
        )
        .order_by(ExceptionItem.sla_due_at, ExceptionItem.id)
        .limit(limit + 1)
    )
    rows = list(session.scalars(stmt).unique())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].sla_due_at, rows[-1].id)
    return rows, next_cursor


def count_exceptions(session: so.Session, *, now: datetime | None = None, **filters: Any) -> int:
    """How many exceptions match the same filters as list_exceptions (without paging)."""
    now = now or utcnow()
    params = {
        name: filters.get(name)
        for name in (
            "state",
            "category",
            "connection",
            "customer",
            "message_type",
            "sla_status",
            "assignee",
            "q",
        )
    }
    stmt = _filtered(session, sa.select(sa.func.count()).select_from(ExceptionItem), now=now, **params)
    return int(session.scalar(stmt) or 0)


def exception_summary(item: ExceptionItem) -> dict:
    """The API list shape of one exception (SPEC 9.3 GET /api/v1/exceptions items).

    Expects message and connection loaded (list_exceptions does that). No patient data.
    """
    return {
        "id": item.id,
        "state": item.state,
        "category": item.category,
        "connection": item.connection.name,
        "message_type": item.message_type,
        "idempotency_key": item.message.idempotency_key,
        "sla_due_at": format_timestamp(item.sla_due_at),
        "created_at": format_timestamp(item.created_at),
        # Additions beyond the contract (SPEC 9: extend, never rename).
        "message_id": item.message_id,
        "version": item.version,
        "assignee": item.assignee.username if item.assignee else None,
    }


@dataclass
class QueueView:
    """What the queue page shows for one named queue."""

    queue: str
    items: list[ExceptionItem]
    next_cursor: str | None
    total: int


def queue_states(queue: str, state: str | None) -> str | tuple[str, ...]:
    """The states a named queue covers; an explicit state filter wins."""
    if state:
        return state
    if queue == "escalated":
        return ExceptionState.ESCALATED.value
    if queue == "awaiting_approval":
        return ExceptionState.PENDING_APPROVAL.value
    if queue == "all":
        return ACTIVE_STATES
    # A category queue is the open work of that category (SPEC 3.1: open = "in a human queue");
    # escalated items have their own queue. state = open AND category = X is one in-order range
    # of ix_exceptions_queue, so a page is read straight off the index without sorting.
    return ExceptionState.OPEN.value


def queue_page(
    session: so.Session,
    queue: str,
    *,
    filters: dict[str, Any],
    cursor: str | None = None,
    limit: int = DEFAULT_PAGE,
    now: datetime | None = None,
) -> QueueView:
    """One page of a named queue (category, 'escalated', 'awaiting_approval' or 'all')."""
    if queue not in QUEUES:
        raise NotFound(f"no queue named {queue!r}")
    now = now or utcnow()
    params = dict(filters)
    params["state"] = queue_states(queue, params.get("state"))
    if queue in CATEGORIES:
        params["category"] = queue
    items, next_cursor = list_exceptions(session, cursor=cursor, limit=limit, now=now, **params)
    total = count_exceptions(session, now=now, **params)
    return QueueView(queue, items, next_cursor, total)


def queue_counts(session: so.Session, now: datetime | None = None) -> dict[str, dict[str, int]]:
    """Per named queue: {"total", "breached"} of the items it holds by default."""
    now = now or utcnow()
    breached = sa.func.sum(sa.case((ExceptionItem.sla_due_at <= now, 1), else_=0))
    rows = session.execute(
        sa.select(ExceptionItem.state, ExceptionItem.category, sa.func.count(), breached)
        .where(ExceptionItem.state.in_(ACTIVE_STATES))
        .group_by(ExceptionItem.state, ExceptionItem.category)
    ).all()
    counts = {q: {"total": 0, "breached": 0} for q in QUEUES}
    for state, category, total, late in rows:
        late = int(late or 0)
        targets = ["all"]
        if state == ExceptionState.ESCALATED:
            targets.append("escalated")
        if state == ExceptionState.PENDING_APPROVAL:
            targets.append("awaiting_approval")
        if state == ExceptionState.OPEN and category in counts:
            targets.append(category)
        for target in targets:
            counts[target]["total"] += total
            counts[target]["breached"] += late
    return counts


def items_by_ids(session: so.Session, ids: Iterable[int]) -> list[ExceptionItem]:
    """Exceptions for a fixed list of ids (bulk actions), in SLA order."""
    ids = list(ids)
    if not ids:
        return []
    return list(
        session.scalars(
            sa.select(ExceptionItem)
            .where(ExceptionItem.id.in_(ids))
            .options(so.joinedload(ExceptionItem.message), so.joinedload(ExceptionItem.connection))
            .order_by(ExceptionItem.sla_due_at, ExceptionItem.id)
        ).unique()
    )


# --- filter choices -------------------------------------------------------------------------------


def customer_names(session: so.Session) -> list[str]:
    """Customer names for filter choices."""
    return list(session.scalars(sa.select(Customer.name).order_by(Customer.name)))


def connection_names(session: so.Session) -> list[str]:
    """Connection names for filter choices."""
    return list(session.scalars(sa.select(Connection.name).order_by(Connection.name)))


def assignable_users(session: so.Session) -> list[User]:
    """Active reviewers and clinical leads: the people exceptions can be assigned to."""
    return list(
        session.scalars(
            sa.select(User)
            .where(User.active.is_(True), User.role.in_((Role.REVIEWER.value, Role.CLINICAL_LEAD.value)))
            .order_by(User.username)
        )
    )


# --- exception detail -----------------------------------------------------------------------------


@dataclass
class ExceptionDetail:
    """Everything the detail page shows about one exception."""

    item: ExceptionItem
    payload_versions: list[PayloadVersion]
    attempts: list[Attempt]
    decisions: list[Decision]
    replays: list[Replay]
    audit_events: list[AuditEvent]
    pending_replay: Replay | None = None

    @property
    def latest_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def latest_issues(self) -> list[dict]:
        """OperationOutcome issues / HL7 ERR entries of the newest attempt that has any."""
        for attempt in reversed(self.attempts):
            if attempt.issues:
                return list(attempt.issues)
        return []


def exception_detail(session: so.Session, exception_id: int, *, audit_limit: int = 200) -> ExceptionDetail:
    """The detail bundle for one exception, in a fixed number of queries. NotFound if absent."""
    item = session.scalar(
        sa.select(ExceptionItem)
        .where(ExceptionItem.id == exception_id)
        .options(
            so.joinedload(ExceptionItem.message),
            so.joinedload(ExceptionItem.connection),
            so.joinedload(ExceptionItem.customer),
            so.joinedload(ExceptionItem.assignee),
        )
    )
    if item is None:
        raise NotFound(f"exception {exception_id} not found")
    # Payload text is PHI: the version list carries metadata only; the viewer goes through
    # the audited exceptions.view_payload.
    versions = list(
        session.scalars(
            sa.select(PayloadVersion)
            .where(PayloadVersion.message_id == item.message_id)
            .options(so.defer(PayloadVersion.raw), so.defer(PayloadVersion.text))
            .order_by(PayloadVersion.version)
        )
    )
    attempts = list(
        session.scalars(
            sa.select(Attempt)
            .where(Attempt.message_id == item.message_id)
            .order_by(Attempt.started_at, Attempt.id)
        )
    )
    decisions = list(
        session.scalars(sa.select(Decision).where(Decision.exception_id == item.id).order_by(Decision.id))
    )
    replays = list(
        session.scalars(
            sa.select(Replay)
            .where(Replay.exception_id == item.id)
            .options(
                so.selectinload(Replay.requested_by),
                so.selectinload(Replay.approved_by),
                so.selectinload(Replay.payload_version).defer(PayloadVersion.raw).defer(PayloadVersion.text),
            )
            .order_by(Replay.id)
        )
    )
    subjects = [
        sa.and_(AuditEvent.subject_type == "exception", AuditEvent.subject_id == str(item.id)),
        sa.and_(AuditEvent.subject_type == "message", AuditEvent.subject_id == item.message_id),
    ]
    if replays:
        subjects.append(
            sa.and_(
                AuditEvent.subject_type == "replay", AuditEvent.subject_id.in_([str(r.id) for r in replays])
            )
        )
    events = list(
        session.scalars(
            sa.select(AuditEvent).where(sa.or_(*subjects)).order_by(AuditEvent.id).limit(audit_limit)
        )
    )
    pending = next((r for r in replays if r.state == "pending_approval"), None)
    return ExceptionDetail(item, versions, attempts, decisions, replays, events, pending)


def proposed_repair(session: so.Session, message: Message) -> PayloadVersion | None:
    """A repair proposed at intake (mojibake) that is newer than the current payload, if any."""
    current = session.get(PayloadVersion, message.current_payload_id) if message.current_payload_id else None
    return session.scalar(
        sa.select(PayloadVersion)
        .where(
            PayloadVersion.message_id == message.id,
            PayloadVersion.reason.like(f"{PROPOSED_REPAIR}%"),
            PayloadVersion.version > (current.version if current else 0),
        )
        .order_by(PayloadVersion.version.desc())
        .limit(1)
    )


def original_payload(session: so.Session, message_id: str) -> PayloadVersion | None:
    """Version 1 of a message's payload: what intake stored, the base of every correction diff."""
    return session.scalar(
        sa.select(PayloadVersion).where(PayloadVersion.message_id == message_id, PayloadVersion.version == 1)
    )


# --- approvals and replays ------------------------------------------------------------------------


@dataclass
class PendingApproval:
    replay: Replay
    item: ExceptionItem
    original: PayloadVersion | None  # version 1, for the correction diff
    proposed: PayloadVersion  # the version the replay would send


def pending_approvals(session: so.Session, limit: int = 100) -> list[PendingApproval]:
    """Replays waiting for a clinical lead, oldest request first."""
    replays = list(
        session.scalars(
            sa.select(Replay)
            .where(Replay.state == "pending_approval")
            .options(so.selectinload(Replay.requested_by), so.selectinload(Replay.payload_version))
            .order_by(Replay.requested_at, Replay.id)
            .limit(limit)
        )
    )
    if not replays:
        return []
    items = {
        i.id: i
        for i in session.scalars(
            sa.select(ExceptionItem)
            .where(ExceptionItem.id.in_([r.exception_id for r in replays]))
            .options(
                so.joinedload(ExceptionItem.message),
                so.joinedload(ExceptionItem.connection),
                so.joinedload(ExceptionItem.customer),
            )
        ).unique()
    }
    corrected = [r.message_id for r in replays if r.corrected]
    originals = {}
    if corrected:
        originals = {
            v.message_id: v
            for v in session.scalars(
                sa.select(PayloadVersion).where(
                    PayloadVersion.message_id.in_(corrected), PayloadVersion.version == 1
                )
            )
        }
    return [
        PendingApproval(r, items[r.exception_id], originals.get(r.message_id), r.payload_version)
        for r in replays
        if r.exception_id in items
    ]


@dataclass
class ReplayRow:
    replay: Replay
    item: ExceptionItem | None


def replay_list(session: so.Session, *, limit: int = 50, before_id: int | None = None) -> list[ReplayRow]:
    """Replays newest first (keyset on id), with requester/approver and their exceptions."""
    stmt = sa.select(Replay).options(
        so.selectinload(Replay.requested_by), so.selectinload(Replay.approved_by)
    )
    if before_id:
        stmt = stmt.where(Replay.id < before_id)
    replays = list(session.scalars(stmt.order_by(Replay.id.desc()).limit(limit)))
    items = {}
    if replays:
        items = {
            i.id: i
            for i in session.scalars(
                sa.select(ExceptionItem)
                .where(ExceptionItem.id.in_({r.exception_id for r in replays}))
                .options(so.joinedload(ExceptionItem.connection))
            ).unique()
        }
    return [ReplayRow(r, items.get(r.exception_id)) for r in replays]


def replay_state_counts(session: so.Session) -> dict[str, int]:
    """Replays per state (progress of bulk replays at a glance)."""
    rows = session.execute(sa.select(Replay.state, sa.func.count()).group_by(Replay.state)).all()
    return {state: int(n) for state, n in rows}


def replays_running(session: so.Session) -> int:
    """Replays a worker still owes a result for."""
    return int(
        session.scalar(
            sa.select(sa.func.count()).select_from(Replay).where(Replay.state.in_(RUNNING_REPLAY_STATES))
        )
        or 0
    )


# --- audit search ---------------------------------------------------------------------------------


@dataclass
class AuditFilters:
    actor: str | None = None
    action: str | None = None
    subject_type: str | None = None
    subject_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def audit_page(
    session: so.Session, filters: AuditFilters, *, before_id: int | None = None, limit: int = DEFAULT_PAGE
) -> tuple[list[AuditEvent], int | None]:
    """Audit events newest first, keyset on id; returns (events, next before_id or None)."""
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = sa.select(AuditEvent)
    if filters.actor:
        stmt = stmt.where(AuditEvent.actor == filters.actor)
    if filters.action:
        # A trailing '.' searches a family of actions (e.g. 'decision.').
        if filters.action.endswith("."):
            stmt = stmt.where(AuditEvent.action.like(_escape_like(filters.action) + "%", escape="\\"))
        else:
            stmt = stmt.where(AuditEvent.action == filters.action)
    if filters.subject_type:
        stmt = stmt.where(AuditEvent.subject_type == filters.subject_type)
    if filters.subject_id:
        stmt = stmt.where(AuditEvent.subject_id == str(filters.subject_id))
    if filters.since:
        stmt = stmt.where(AuditEvent.occurred_at >= filters.since)
    if filters.until:
        stmt = stmt.where(AuditEvent.occurred_at < filters.until)
    if before_id:
        stmt = stmt.where(AuditEvent.id < before_id)
    rows = list(session.scalars(stmt.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    next_before = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_before = rows[-1].id
    return rows, next_before


# --- dashboard ------------------------------------------------------------------------------------


@dataclass
class ScopeCounts:
    """Active exceptions of one customer/connection."""

    customer: str
    connection: str
    total: int
    at_risk: int
    breached: int
    oldest_created_at: datetime | None


@dataclass
class ConnectionHealth:
    name: str
    customer: str
    protocol: str
    enabled: bool
    circuit: str  # closed / open / half_open
    consecutive_failures: int
    circuit_open_until: datetime | None


@dataclass
class Dashboard:
    now: datetime
    matrix: dict[str, dict[str, int]]  # category -> sla status -> count (active exceptions)
    status_totals: dict[str, int]
    total_active: int
    breached: int
    oldest_created_at: datetime | None
    scopes: list[ScopeCounts]
    connections: list[ConnectionHealth]
    attempts_24h: dict[str, int]
    replays_24h: dict[str, int]
    series_times: list[datetime] = field(default_factory=list)
    depth_series: list[int] = field(default_factory=list)
    breach_series: list[int] = field(default_factory=list)

    @property
    def oldest_age(self) -> timedelta | None:
        return self.now - self.oldest_created_at if self.oldest_created_at else None


def dashboard(session: so.Session, now: datetime | None = None, *, buckets: int = 24) -> Dashboard:
    """All dashboard aggregates: a handful of GROUP BY queries, no per-row work."""
    now = now or utcnow()
    active = ExceptionItem.state.in_(ACTIVE_STATES)
    # Group over a subquery: grouping by a CASE with bound parameters is fragile on PostgreSQL.
    per_item = (
        sa.select(ExceptionItem.category.label("category"), _sla_case(session, now).label("sla"))
        .where(active)
        .subquery()
    )

    matrix = {c: {s: 0 for s in SLA_STATUSES} for c in CATEGORIES}
    for category, sla, n in session.execute(
        sa.select(per_item.c.category, per_item.c.sla, sa.func.count()).group_by(
            per_item.c.category, per_item.c.sla
        )
    ):
        matrix.setdefault(category, {s: 0 for s in SLA_STATUSES})[sla] = int(n)
    status_totals = {s: sum(row[s] for row in matrix.values()) for s in SLA_STATUSES}

    breached_sum = sa.func.sum(sa.case((_sla_condition(session, SlaStatus.BREACHED, now), 1), else_=0))
    at_risk_sum = sa.func.sum(sa.case((_sla_condition(session, SlaStatus.AT_RISK, now), 1), else_=0))
    scope_rows = session.execute(
        sa.select(
            Customer.name,
            Connection.name,
            sa.func.count(ExceptionItem.id),
            at_risk_sum,
            breached_sum,
            sa.func.min(ExceptionItem.created_at),
        )
        .select_from(ExceptionItem)
        .join(Connection, Connection.id == ExceptionItem.connection_id)
        .join(Customer, Customer.id == ExceptionItem.customer_id)
        .where(active)
        .group_by(Customer.name, Connection.name)
        .order_by(Customer.name, Connection.name)
    ).all()
    scopes = [
        ScopeCounts(cust, conn, int(total), int(risk or 0), int(late or 0), oldest)
        for cust, conn, total, risk, late, oldest in scope_rows
    ]
    oldest = min((s.oldest_created_at for s in scopes if s.oldest_created_at), default=None)

    health = [
        ConnectionHealth(
            c.name,
            c.customer.name,
            c.protocol,
            c.enabled,
            connections.circuit_state(c, now),
            c.consecutive_failures,
            c.circuit_open_until,
        )
        for c in session.scalars(
            sa.select(Connection).options(so.joinedload(Connection.customer)).order_by(Connection.name)
        )
    ]

    day_ago = now - timedelta(hours=24)
    attempts = {
        outcome: int(n)
        for outcome, n in session.execute(
            sa.select(Attempt.outcome, sa.func.count())
            .where(Attempt.started_at >= day_ago)
            .group_by(Attempt.outcome)
        )
    }
    replays = {
        state: int(n)
        for state, n in session.execute(
            sa.select(Replay.state, sa.func.count())
            .where(Replay.requested_at >= day_ago)
            .group_by(Replay.state)
        )
    }
    times, depth, breaches = _history(session, now, buckets)
    return Dashboard(
        now=now,
        matrix=matrix,
        status_totals=status_totals,
        total_active=sum(status_totals.values()),
        breached=status_totals[SlaStatus.BREACHED],
        oldest_created_at=oldest,
        scopes=scopes,
        connections=health,
        attempts_24h=attempts,
        replays_24h=replays,
        series_times=times,
        depth_series=depth,
        breach_series=breaches,
    )


def _history(
    session: so.Session, now: datetime, buckets: int, step: timedelta = timedelta(hours=1)
) -> tuple[list[datetime], list[int], list[int]]:
    """Queue depth and breached count at the end of each of the last `buckets` hours.

    Reconstructed from created_at / resolved_at / sla_due_at in ONE query (a SUM(CASE) column
    per point); an item whose SLA restarted (new category) counts with its current due time.
    """
    times = [now - step * (buckets - 1 - i) for i in range(buckets)]
    columns = []
    for t in times:
        present = sa.and_(
            ExceptionItem.created_at <= t,
            sa.or_(ExceptionItem.resolved_at.is_(None), ExceptionItem.resolved_at > t),
            # Resolved items without resolved_at (none today) would otherwise count forever.
            sa.or_(ExceptionItem.resolved_at.is_not(None), ExceptionItem.state.in_(ACTIVE_STATES)),
        )
        columns.append(sa.func.sum(sa.case((present, 1), else_=0)))
        columns.append(sa.func.sum(sa.case((sa.and_(present, ExceptionItem.sla_due_at <= t), 1), else_=0)))
    since = times[0]
    row = session.execute(
        sa.select(*columns).where(
            ExceptionItem.created_at <= now,
            sa.or_(ExceptionItem.resolved_at.is_(None), ExceptionItem.resolved_at > since),
        )
    ).one()
    values = [int(v or 0) for v in row]
    return times, values[0::2], values[1::2]


# --- admin listings -------------------------------------------------------------------------------


def all_users(session: so.Session) -> list[User]:
    """Every user, by name (admin page)."""
    return list(session.scalars(sa.select(User).order_by(User.username)))


def api_tokens(session: so.Session) -> list[ApiToken]:
    """API tokens newest first, with their users (only prefixes; tokens are stored hashed)."""
    return list(
        session.scalars(
            sa.select(ApiToken).options(so.joinedload(ApiToken.user)).order_by(ApiToken.id.desc())
        )
    )


def connections_overview(session: so.Session) -> list[Connection]:
    """Connections with their customers, by name."""
    return list(
        session.scalars(
            sa.select(Connection).options(so.joinedload(Connection.customer)).order_by(Connection.name)
        )
    )


def customers(session: so.Session) -> list[Customer]:
    """Customers by name."""
    return list(session.scalars(sa.select(Customer).order_by(Customer.name)))


def sla_rules(session: so.Session) -> list[tuple[SlaRuleRow, str | None]]:
    """Stored SLA rules with their customer's name (None = every customer)."""
    rows = session.execute(
        sa.select(SlaRuleRow, Customer.name)
        .outerjoin(Customer, Customer.id == SlaRuleRow.customer_id)
        .order_by(Customer.name.is_not(None), Customer.name, SlaRuleRow.category, SlaRuleRow.risk)
    ).all()
    return [(rule, name) for rule, name in rows]
