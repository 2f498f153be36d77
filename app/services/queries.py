"""Read side for the console and the API: listings, aggregates and detail bundles.

Nothing here writes. Every listing is ordered by an indexed key and paginated by keyset
(never OFFSET), and related rows are loaded with joinedload/selectinload so a page costs a
fixed number of queries however many rows it shows.

The queue order is (sla_due_at, id). Every queue reads the active rows only, through partial
indexes declared WHERE <the active states> (app/db/active.py, migration 0007): a category queue
(state = open AND category = X) and a cursor position within it are one range of
`ix_exceptions_queue (state, category, sla_due_at, id)`; the "all" queue one range of
`ix_exceptions_active_due (sla_due_at, id)`; a state, customer, connection, category or assignee
filter one range of `ix_exceptions_active_<that> (<column>, sla_due_at, id)` — each read in order,
never sorting, never visiting the resolved history. The state filter is written with its values in
the SQL (`state_in`) so the planner can prove the index predicate.

Counts never count the queues: they come from `exception_counts`, a per (category, state, customer,
connection, SLA status) summary the worker refreshes (app/services/summaries.py), shown with its
time ("counts as of 10:42:05"). Only when there is no recent summary (a fresh install, tests, no
worker for a while) are the same numbers counted live. Filters the summary has no column for
(free text, message type, assignee, history states) get an exact count bounded at BOUNDED_COUNT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.active import ACTIVE_STATES as ACTIVE_INDEX_STATES
from app.db.active import literal_states, state_in
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
from app.db.summary_models import ExceptionCount, ReadSummary
from app.domain.audit_chain import format_timestamp
from app.domain.delivery import Category
from app.domain.errors import Invalid, NotFound
from app.domain.identifiers import search_values
from app.domain.payloads import PROPOSED_REPAIR
from app.domain.roles import Role, mask_identifier, masks_patient_identifiers
from app.domain.sla import AT_RISK_FRACTION, SlaStatus
from app.domain.states import FINAL_STATES, ExceptionState

from . import connections
from .clock import utcnow

ACTIVE_STATES = tuple(s.value for s in ExceptionState if s not in FINAL_STATES)
assert ACTIVE_STATES == ACTIVE_INDEX_STATES, "app/db/active.py (the partial index predicate) is out of date"
ALL_STATES = tuple(s.value for s in ExceptionState)
FINAL_STATE_VALUES = tuple(s.value for s in ExceptionState if s in FINAL_STATES)
CLOSED = "closed"  # the state filter's name for both final states (resolved, discarded)
STATE_FILTERS = (*ALL_STATES, CLOSED)
CATEGORIES = tuple(c.value for c in Category)
SLA_STATUSES = tuple(s.value for s in SlaStatus)
DEFAULT_PAGE = 50
MAX_PAGE = 500  # the API allows up to 500 per page
UNASSIGNED = "-"  # assignee filter value meaning "nobody"
MIN_PREFIX = 4  # free-text prefix searches need at least this many characters
BOUNDED_COUNT = 1000  # exact counts of filters the summary cannot answer stop here ("1000+")
TREND_BUCKETS = 24  # the dashboard's hourly points, as the summary stores them


def summary_max_age_seconds() -> float:
    """Counts older than this are not shown: the same numbers are counted live instead."""
    return float(os.environ.get("RECON_SUMMARY_MAX_AGE_SECONDS", "120"))


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
        if not 0 <= item_id <= 2**31 - 1:  # the id column is a 32-bit integer on PostgreSQL
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
        stmt = stmt.where(state_in(ExceptionItem.state, states, _dialect(session)))
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
        # One IN over a union of the few exceptions that can match (their message by id, control
        # id or key; by a patient or order identifier it carries: `Patient/123456`, an MRN, ORC-2;
        # or the exception id itself): the planner starts from those few and fetches them by
        # primary key, instead of testing every active row against an OR of subqueries.
        other = so.aliased(ExceptionItem)
        candidates = [
            sa.select(other.id).where(other.message_id.in_(sa.select(Message.id).where(sa.or_(*exact)))),
            sa.select(other.id).where(
                other.message_id.in_(
                    sa.select(MessageIdentifier.message_id).where(
                        MessageIdentifier.value.in_(search_values(text))
                    )
                )
            ),
        ]
        if _id_like(text):
            candidates.append(sa.select(sa.literal(int(text), sa.Integer)))
        found = ExceptionItem.id.in_(sa.union(*candidates))
        stmt = stmt.where(found)
    return stmt


def _dialect(session: so.Session) -> str:
    return session.get_bind().dialect.name


# What a listing shows of each row's relations, loaded in the same query: only the columns a list
# uses, so a page does not fetch and decode every row's full message (its stored response JSON)
# and connection (its settings) once per row. Anything else stays reachable (a deferred load).
LIST_LOADS = (
    so.joinedload(ExceptionItem.message).load_only(
        Message.id,
        Message.idempotency_key,
        Message.control_id,
        Message.patient_ref,
        Message.clinical_risk,
        Message.message_type,
        Message.status,
    ),
    so.joinedload(ExceptionItem.connection).load_only(Connection.id, Connection.name, Connection.customer_id),
    so.joinedload(ExceptionItem.customer).load_only(Customer.id, Customer.name),
    so.joinedload(ExceptionItem.assignee).load_only(User.id, User.username, User.role),
)


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
    # A first page has its size written into the SQL (at most MAX_PAGE + 1 distinct statements):
    # with it as a parameter PostgreSQL's generic plan does not know only a page is wanted, so at
    # a million rows it re-planned the first page on every call (~2 ms that the 1k queue did not
    # pay). A page after a cursor keeps it as a parameter: a generic plan for the cursor's range
    # measured ten times slower (20k backlog: p50 36 ms against 4 ms re-planned).
    page = limit + 1 if cursor else sa.literal(limit + 1, literal_execute=True)
    stmt = stmt.options(*LIST_LOADS).order_by(ExceptionItem.sla_due_at, ExceptionItem.id).limit(page)
    rows = list(session.scalars(stmt).unique())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].sla_due_at, rows[-1].id)
    return rows, next_cursor


def count_exceptions(
    session: so.Session, *, now: datetime | None = None, limit: int | None = None, **filters: Any
) -> int:
    """How many exceptions match the same filters as list_exceptions (without paging).

    limit: stop counting there (the answer is then at most `limit`) — what a page may afford for
    filters the summary cannot answer. Without it the count is exact and as long as the match.
    """
    now = now or utcnow()
    params = {name: filters.get(name) for name in FILTERS}
    if limit is None:
        stmt = _filtered(session, sa.select(sa.func.count()).select_from(ExceptionItem), now=now, **params)
        return int(session.scalar(stmt) or 0)
    matches = _filtered(session, sa.select(ExceptionItem.id), now=now, **params).limit(limit).subquery()
    return int(session.scalar(sa.select(sa.func.count()).select_from(matches)) or 0)


FILTERS = ("state", "category", "connection", "customer", "message_type", "sla_status", "assignee", "q")


# --- counts: the summary, or the same numbers counted live -----------------------------------------


@dataclass(frozen=True)
class CountSource:
    """Where counts come from: rows (category, state, customer_id, connection_id, sla_status, n,
    oldest_created_at) over the active exceptions, as of `as_of`. `live`: counted now, because no
    summary is recent enough."""

    rows: sa.FromClause
    as_of: datetime
    live: bool
    # The summary's rollups of those rows (see `rollups`), stored by the same refresh; None when
    # counting live (or for a summary written before migration 0014): then pages aggregate `rows`.
    rollups: dict | None = None


def active_groups(session: so.Session, now: datetime) -> sa.Select:
    """The active exceptions grouped as the summary stores them: one pass over the active rows
    (the partial indexes hold just those), SLA status as of `now`."""
    per_item = (
        sa.select(
            ExceptionItem.category.label("category"),
            ExceptionItem.state.label("state"),
            ExceptionItem.customer_id.label("customer_id"),
            ExceptionItem.connection_id.label("connection_id"),
            _sla_case(session, now).label("sla_status"),
            ExceptionItem.created_at.label("created_at"),
        )
        .where(literal_states(ExceptionItem.state, ACTIVE_STATES))
        .subquery()
    )
    c = per_item.c
    # Group over a subquery: grouping by a CASE with bound parameters is fragile on PostgreSQL.
    return sa.select(
        c.category,
        c.state,
        c.customer_id,
        c.connection_id,
        c.sla_status,
        sa.func.count().label("n"),
        sa.func.min(c.created_at).label("oldest_created_at"),
    ).group_by(c.category, c.state, c.customer_id, c.connection_id, c.sla_status)


def count_source(session: so.Session, now: datetime | None = None) -> CountSource:
    """The summary when it is at most `summary_max_age_seconds()` old, else a live count. Cached
    on the session, so the sidebar, the page total and the dashboard of one request agree."""
    now = now or utcnow()
    cached = session.info.get("recon_count_source")
    if cached is not None:
        return cached
    stored = session.execute(
        sa.select(ReadSummary.counts_as_of, ReadSummary.rollups).where(ReadSummary.id == 1)
    ).first()
    as_of, stored_rollups = stored if stored is not None else (None, None)
    if as_of is not None and 0 <= (now - as_of).total_seconds() <= summary_max_age_seconds():
        table = ExceptionCount.__table__
        source = CountSource(
            sa.select(
                table.c.category,
                table.c.state,
                table.c.customer_id,
                table.c.connection_id,
                table.c.sla_status,
                table.c.n,
                table.c.oldest_created_at,
            ).subquery("counts"),
            as_of,
            live=False,
            rollups=stored_rollups if stored_rollups and stored_rollups.get("v") == ROLLUP_VERSION else None,
        )
    else:
        source = CountSource(active_groups(session, now).subquery("counts"), now, live=True)
    session.info["recon_count_source"] = source
    return source


ROLLUP_VERSION = 2  # the shape below; a stored rollup of another shape is not read


def _queues_holding(state: str, category: str) -> list[str]:
    """The queues an active item in this state and category counts in: all, its category's
    (every active state), and escalated / awaiting approval by state."""
    targets = ["all"]
    if state == ExceptionState.ESCALATED:
        targets.append("escalated")
    if state == ExceptionState.PENDING_APPROVAL:
        targets.append("awaiting_approval")
    if category in QUEUES:
        targets.append(category)
    return targets


def rollups(groups: Iterable[dict]) -> dict:
    """What every page needs of the counts, computed once per refresh from its groups (dicts with
    the keys of `active_groups`) rather than once per page view: per named queue {"total",
    "breached"}; the dashboard's category × SLA status matrix; and per (customer_id,
    connection_id) [total, at risk, breached, oldest created_at ISO or None]; per named queue and
    SLA status (a queue filtered by SLA status alone). JSON-ready."""
    queues = {q: {"total": 0, "breached": 0} for q in QUEUES}
    by_sla = {q: {status: 0 for status in SLA_STATUSES} for q in QUEUES}
    matrix: dict[str, dict[str, int]] = {}
    scopes: dict[tuple[int, int], list] = {}
    for g in groups:
        n, state, category, sla = int(g["n"]), g["state"], g["category"], g["sla_status"]
        late = n if sla == SlaStatus.BREACHED.value else 0
        for target in _queues_holding(state, category):
            queues[target]["total"] += n
            queues[target]["breached"] += late
            by_sla[target][sla] = by_sla[target].get(sla, 0) + n
        cell = matrix.setdefault(category, {s: 0 for s in SLA_STATUSES})
        cell[sla] = cell.get(sla, 0) + n
        scope = scopes.setdefault((g["customer_id"], g["connection_id"]), [0, 0, 0, None])
        scope[0] += n
        scope[1] += n if sla == SlaStatus.AT_RISK.value else 0
        scope[2] += late
        oldest = g.get("oldest_created_at")
        if oldest is not None and (scope[3] is None or oldest < scope[3]):
            scope[3] = oldest
    return {
        "v": ROLLUP_VERSION,
        "queues": queues,
        "by_sla": by_sla,
        "matrix": matrix,
        "scopes": [
            [
                customer_id,
                connection_id,
                total,
                risk,
                late,
                oldest.isoformat() if isinstance(oldest, datetime) else oldest,
            ]
            for (customer_id, connection_id), (total, risk, late, oldest) in sorted(scopes.items())
        ],
    }


def summary_total(session: so.Session, source: CountSource, params: dict[str, Any]) -> int | None:
    """The number of items matching `params` according to the counts, or None when a filter is
    not one of the summary's columns (free text, message type, assignee, or final states)."""
    if any(params.get(name) for name in ("q", "message_type", "assignee")):
        return None
    states = _as_values(params.get("state"), ALL_STATES, "state")
    if not states or not set(states) <= set(ACTIVE_STATES):
        return None
    c = source.rows.c
    stmt = sa.select(sa.func.coalesce(sa.func.sum(c.n), 0)).where(c.state.in_(states))
    categories = _as_values(params.get("category"), CATEGORIES, "category")
    if categories:
        stmt = stmt.where(c.category.in_(categories))
    if params.get("sla_status"):
        stmt = stmt.where(c.sla_status == _as_values(params["sla_status"], SLA_STATUSES, "SLA status")[0])
    if params.get("connection"):
        stmt = stmt.where(
            c.connection_id
            == sa.select(Connection.id).where(Connection.name == params["connection"]).scalar_subquery()
        )
    if params.get("customer"):
        stmt = stmt.where(
            c.customer_id
            == sa.select(Customer.id).where(Customer.name == params["customer"]).scalar_subquery()
        )
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
    total_capped: bool = False  # more than `total` match (a bounded count stopped there)
    counts_as_of: datetime | None = None  # the summary's time (None: counted when the page was made)
    counts_live: bool = True
    # A free-text search that leaves out the final states: how many closed items match it too
    # ("3 closed items match — show them"), counted up to BOUNDED_COUNT.
    closed_matches: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # exception id -> failure reason (masked per role)
    now: datetime | None = None  # the page's clock: every row's SLA status is taken at this time


def queue_states(queue: str, state: str | None) -> str | tuple[str, ...]:
    """The states a named queue covers; an explicit state filter wins."""
    if state == CLOSED:
        return FINAL_STATE_VALUES
    if state:
        return state
    if queue == "escalated":
        return ExceptionState.ESCALATED.value
    if queue == "awaiting_approval":
        return ExceptionState.PENDING_APPROVAL.value
    # "all" and a category queue hold every active state (issue 8: the dashboard's "transport 11"
    # is the transport queue's 11, whatever state each item is in; the state filter narrows it).
    # category = X over the active rows is one in-order range of ix_exceptions_active_category;
    # with a state filter, state = S AND category = X one range of ix_exceptions_queue.
    return ACTIVE_STATES


def _rollup_total(source: CountSource, queue: str, filters: dict[str, Any]) -> int | None:
    """A named queue's total from the summary's rollups, when its only filter (if any) is an SLA
    status: the sidebar's own number, no query. None when another filter needs the groups."""
    if source.rollups is None:
        return None
    extra = {name for name, value in filters.items() if value}
    if not extra:
        return int(source.rollups["queues"].get(queue, {}).get("total", 0))
    if extra == {"sla_status"}:
        status = _as_values(filters["sla_status"], SLA_STATUSES, "SLA status")[0]
        return int(source.rollups["by_sla"].get(queue, {}).get(status, 0))
    return None


def queue_page(
    session: so.Session,
    queue: str,
    *,
    filters: dict[str, Any],
    cursor: str | None = None,
    limit: int = DEFAULT_PAGE,
    now: datetime | None = None,
) -> QueueView:
    """One page of a named queue (category, 'escalated', 'awaiting_approval' or 'all').

    The total comes from the counts (the summary, with its time) when every filter is one of its
    columns; otherwise it is counted exactly up to BOUNDED_COUNT ("1000+" beyond).
    """
    if queue not in QUEUES:
        raise NotFound(f"no queue named {queue!r}")
    now = now or utcnow()
    params = dict(filters)
    params["state"] = queue_states(queue, params.get("state"))
    if queue in CATEGORIES:
        params["category"] = queue
    items, next_cursor = list_exceptions(session, cursor=cursor, limit=limit, now=now, **params)
    source = count_source(session, now)
    total = _rollup_total(source, queue, filters)
    if total is None:
        total = summary_total(session, source, params)
    if total is not None:
        view = QueueView(queue, items, next_cursor, total, False, source.as_of, source.live)
    else:
        counted = count_exceptions(session, now=now, limit=BOUNDED_COUNT + 1, **params)
        view = QueueView(
            queue, items, next_cursor, min(counted, BOUNDED_COUNT), counted > BOUNDED_COUNT, None, True
        )
    states = _as_values(params["state"], ALL_STATES, "state")
    if params.get("q") and not set(states) & set(FINAL_STATE_VALUES):
        # A search is a few primary-key lookups (see _filtered), so counting its closed matches
        # costs no scan of the history.
        view.closed_matches = count_exceptions(
            session, now=now, limit=BOUNDED_COUNT, **{**params, "state": FINAL_STATE_VALUES}
        )
    view.now = now
    return view


def failure_reasons(session: so.Session, items: list[ExceptionItem], role: str) -> dict[int, str]:
    """Why each item failed (its detail), one line, as `role` may see it in a list: for roles that
    see masked identifiers (SPEC 3.4), every identifier the message carries and anything shaped
    like one is masked (app.domain.roles.mask_identifier). One query for the whole page."""
    if not items:
        return {}
    if not masks_patient_identifiers(role):
        return {i.id: _one_line(i.detail) for i in items}
    known: dict[str, set[str]] = {}
    for message_id, value in session.execute(
        sa.select(MessageIdentifier.message_id, MessageIdentifier.value).where(
            MessageIdentifier.message_id.in_({i.message_id for i in items})
        )
    ):
        known.setdefault(message_id, set()).add(value)
    out = {}
    for item in items:
        values = set(known.get(item.message_id, ()))
        if item.message.patient_ref:
            values |= set(search_values(item.message.patient_ref))
        out[item.id] = mask_reason(_one_line(item.detail), values)
    return out


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())[:REASON_CHARS]


REASON_CHARS = 300
# Anything shaped like an identifier: 4+ digits in a row, letters mixed with digits (MRN-AB1234),
# HL7 components (DOE^JOHN), and quoted values (an EHR's diagnostics often echo the bad value).
_IDENTIFIER_SHAPES = re.compile(
    r"""'[^']*'|"[^"]*"|[^\s'"]*\^[^\s'"]*|[A-Za-z0-9_./:#-]*\d{4,}[A-Za-z0-9_./:#-]*"""
    r"""|\b(?=[A-Za-z0-9-]*[A-Za-z])(?=[A-Za-z0-9-]*\d)[A-Za-z0-9-]{5,}\b"""
)
# Field paths and protocol words that look like identifiers but say where, not who.
_KEEP = re.compile(r"^(?:HTTP|R4B?|v2\.\d+|[A-Z][A-Z0-9]{2}-\d+(?:\.\d+)*|[A-Z][A-Z0-9]{2}\[\d+\]-\d+)$")


def mask_reason(text: str, identifiers: Iterable[str] = ()) -> str:
    """`text` with the given identifier values and identifier-shaped tokens masked."""
    for value in sorted({v for v in identifiers if v and len(v) >= 2}, key=len, reverse=True):
        text = text.replace(value, mask_identifier(value))

    def mask(match: re.Match) -> str:
        token = match.group(0)
        if _KEEP.match(token) or "****" in token:
            return token
        if token[:1] in "'\"":
            return token[0] + "****" + token[0]
        if "^" in token:
            return "****"
        return mask_identifier(token)

    return _IDENTIFIER_SHAPES.sub(mask, text)


def queue_counts(session: so.Session, now: datetime | None = None) -> dict[str, dict[str, int]]:
    """Per named queue: {"total", "breached"} of the items it holds by default (from the counts:
    the summary's rollup when there is one, else aggregated here)."""
    source = count_source(session, now)
    if source.rollups is not None:
        stored = source.rollups["queues"]
        return {
            q: {
                "total": int(stored.get(q, {}).get("total", 0)),
                "breached": int(stored.get(q, {}).get("breached", 0)),
            }
            for q in QUEUES
        }
    c = source.rows.c
    breached = sa.func.sum(sa.case((c.sla_status == SlaStatus.BREACHED.value, c.n), else_=0))
    rows = session.execute(
        sa.select(c.state, c.category, sa.func.sum(c.n), breached).group_by(c.state, c.category)
    ).all()
    counts = {q: {"total": 0, "breached": 0} for q in QUEUES}
    for state, category, total, late in rows:
        total, late = int(total or 0), int(late or 0)
        for target in _queues_holding(state, category):
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
    counts_as_of: datetime | None = None  # when the counts above were taken
    counts_live: bool = True  # counted for this view (no recent summary)
    trends_as_of: datetime | None = None  # when the series and the 24-hour figures were taken

    @property
    def oldest_age(self) -> timedelta | None:
        return self.now - self.oldest_created_at if self.oldest_created_at else None


def dashboard(session: so.Session, now: datetime | None = None, *, buckets: int = TREND_BUCKETS) -> Dashboard:
    """All dashboard aggregates, from the summaries the worker keeps (app/services/summaries.py):
    the same counts the queues show, with their time; the trends (hourly series, 24-hour
    throughput) as the worker last computed them. Without recent summaries the same figures are
    computed live. Nothing here reads the history row by row."""
    now = now or utcnow()
    source = count_source(session, now)
    all_connections = list(
        session.scalars(
            sa.select(Connection).options(so.joinedload(Connection.customer)).order_by(Connection.name)
        )
    )
    if source.rollups is not None:
        matrix, scopes = _dashboard_counts_from_rollups(session, source.rollups, all_connections)
    else:
        matrix, scopes = _dashboard_counts(session, source)
    status_totals = {s: sum(row.get(s, 0) for row in matrix.values()) for s in SLA_STATUSES}
    oldest = min((s.oldest_created_at for s in scopes if s.oldest_created_at), default=None)

    health = [
        ConnectionHealth(
            conn.name,
            conn.customer.name,
            conn.protocol,
            conn.enabled,
            connections.circuit_state(conn, now),
            conn.consecutive_failures,
            conn.circuit_open_until,
        )
        for conn in all_connections
    ]

    trends = None
    if not source.live and buckets == TREND_BUCKETS:
        trends = stored_trends(session, now)
    if trends is None:
        trends = compute_trends(session, now, buckets)
    return Dashboard(
        now=now,
        matrix=matrix,
        status_totals=status_totals,
        total_active=sum(status_totals.values()),
        breached=status_totals[SlaStatus.BREACHED],
        oldest_created_at=oldest,
        scopes=scopes,
        connections=health,
        attempts_24h=trends.attempts,
        replays_24h=trends.replays,
        series_times=trends.times,
        depth_series=trends.depth,
        breach_series=trends.breaches,
        counts_as_of=source.as_of,
        counts_live=source.live,
        trends_as_of=trends.as_of,
    )


def _empty_matrix() -> dict[str, dict[str, int]]:
    return {cat: {s: 0 for s in SLA_STATUSES} for cat in CATEGORIES}


def _dashboard_counts_from_rollups(
    session: so.Session, stored: dict, all_connections: list[Connection]
) -> tuple[dict[str, dict[str, int]], list[ScopeCounts]]:
    """The matrix and per-connection rows from the summary's rollups (no aggregation per view);
    names from the connections the dashboard lists anyway."""
    matrix = _empty_matrix()
    for category, row in stored["matrix"].items():
        cell = matrix.setdefault(category, {s: 0 for s in SLA_STATUSES})
        for sla, n in row.items():
            cell[sla] = int(n)
    connection_names = {c.id: c.name for c in all_connections}
    customer_names = {c.customer_id: c.customer.name for c in all_connections}
    missing = {row[0] for row in stored["scopes"]} - set(customer_names)
    if missing:  # an item's customer that owns no connection (not made by the services)
        customer_names.update(
            session.execute(sa.select(Customer.id, Customer.name).where(Customer.id.in_(missing))).tuples()
        )
    merged: dict[tuple[str, str], list] = {}
    for customer_id, connection_id, total, risk, late, oldest in stored["scopes"]:
        if customer_id not in customer_names or connection_id not in connection_names:
            continue  # as the live query's inner joins
        key = (customer_names[customer_id], connection_names[connection_id])
        at = datetime.fromisoformat(oldest) if oldest else None
        row = merged.setdefault(key, [0, 0, 0, None])
        row[0], row[1], row[2] = row[0] + int(total), row[1] + int(risk), row[2] + int(late)
        if at is not None and (row[3] is None or at < row[3]):
            row[3] = at
    scopes = [ScopeCounts(cust, conn, *merged[(cust, conn)]) for cust, conn in sorted(merged)]
    return matrix, scopes


def _dashboard_counts(
    session: so.Session, source: CountSource
) -> tuple[dict[str, dict[str, int]], list[ScopeCounts]]:
    """The matrix and per-connection rows aggregated from the counts' rows (counting live)."""
    c = source.rows.c
    matrix = _empty_matrix()
    for category, sla, n in session.execute(
        sa.select(c.category, c.sla_status, sa.func.sum(c.n)).group_by(c.category, c.sla_status)
    ):
        matrix.setdefault(category, {s: 0 for s in SLA_STATUSES})[sla] = int(n or 0)

    def of_status(status: SlaStatus):
        return sa.func.sum(sa.case((c.sla_status == status.value, c.n), else_=0))

    scope_rows = session.execute(
        sa.select(
            Customer.name,
            Connection.name,
            sa.func.sum(c.n),
            of_status(SlaStatus.AT_RISK),
            of_status(SlaStatus.BREACHED),
            sa.func.min(c.oldest_created_at),
        )
        .select_from(source.rows)
        .join(Connection, Connection.id == c.connection_id)
        .join(Customer, Customer.id == c.customer_id)
        .group_by(Customer.name, Connection.name)
        .order_by(Customer.name, Connection.name)
    ).all()
    scopes = [
        ScopeCounts(cust, conn, int(total or 0), int(risk or 0), int(late or 0), oldest)
        for cust, conn, total, risk, late, oldest in scope_rows
    ]
    return matrix, scopes


@dataclass
class Trends:
    """The dashboard's figures over time: depth and breaches per hour, 24-hour throughput."""

    as_of: datetime
    times: list[datetime]
    depth: list[int]
    breaches: list[int]
    attempts: dict[str, int]
    replays: dict[str, int]

    def to_json(self) -> dict:
        return {
            "times": [t.isoformat() for t in self.times],
            "depth": self.depth,
            "breaches": self.breaches,
            "attempts": self.attempts,
            "replays": self.replays,
        }

    @classmethod
    def from_json(cls, as_of: datetime, data: dict) -> Trends:
        return cls(
            as_of,
            [datetime.fromisoformat(t) for t in data["times"]],
            [int(v) for v in data["depth"]],
            [int(v) for v in data["breaches"]],
            {k: int(v) for k, v in data["attempts"].items()},
            {k: int(v) for k, v in data["replays"].items()},
        )


def stored_trends(session: so.Session, now: datetime) -> Trends | None:
    """The trends the worker stored, if recent enough to show (same age limit as the counts)."""
    row = session.execute(
        sa.select(ReadSummary.trends_as_of, ReadSummary.trends).where(ReadSummary.id == 1)
    ).first()
    if row is None or row.trends_as_of is None or not row.trends:
        return None
    if not 0 <= (now - row.trends_as_of).total_seconds() <= summary_max_age_seconds():
        return None
    return Trends.from_json(row.trends_as_of, row.trends)


def compute_trends(session: so.Session, now: datetime, buckets: int = TREND_BUCKETS) -> Trends:
    """The trends counted now: index range scans over the active rows, the items resolved in the
    window, and the window's attempts and replays (`ix_attempts_started`, `ix_replays_requested`)."""
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
    return Trends(now, times, depth, breaches, attempts, replays)


def _history(
    session: so.Session, now: datetime, buckets: int, step: timedelta = timedelta(hours=1)
) -> tuple[list[datetime], list[int], list[int]]:
    """Queue depth and breached count at the end of each of the last `buckets` hours.

    Reconstructed from created_at / resolved_at / sla_due_at in ONE query (a SUM(CASE) column
    per point); an item whose SLA restarted (new category) counts with its current due time.
    Only two kinds of rows can count: active ones (ix_exceptions_active_due) and ones resolved
    within the window (ix_exceptions_resolved_at) — read as a UNION ALL of those two ranges.
    """
    times = [now - step * (buckets - 1 - i) for i in range(buckets)]
    since = times[0]
    columns = (
        ExceptionItem.created_at,
        ExceptionItem.resolved_at,
        ExceptionItem.state,
        ExceptionItem.sla_due_at,
    )
    active = literal_states(ExceptionItem.state, ACTIVE_STATES)
    rows = sa.union_all(
        sa.select(*columns).where(active, ExceptionItem.created_at <= now),
        sa.select(*columns).where(
            ExceptionItem.resolved_at > since, sa.not_(active), ExceptionItem.created_at <= now
        ),
    ).subquery()
    c = rows.c
    out = []
    for t in times:
        present = sa.and_(
            c.created_at <= t,
            sa.or_(c.resolved_at.is_(None), c.resolved_at > t),
            # Resolved items without resolved_at (none today) would otherwise count forever.
            sa.or_(c.resolved_at.is_not(None), c.state.in_(ACTIVE_STATES)),
        )
        out.append(sa.func.sum(sa.case((present, 1), else_=0)))
        out.append(sa.func.sum(sa.case((sa.and_(present, c.sla_due_at <= t), 1), else_=0)))
    row = session.execute(sa.select(*out).select_from(rows)).one()
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


# --- live updates: a cheap "has anything changed?" ------------------------------------------------

CHANGE_WINDOW = timedelta(seconds=30)  # longer than any transaction that writes an exception


def change_token(session: so.Session, now: datetime | None = None) -> str:
    """A short token that changes when any exception is created or changes, or when the counts
    the pages show are refreshed: "<rows>.<counts>". Pages poll with it (`/queues/changes`) and
    re-render only when it moved.

    rows: the newest id (primary key), the newest updated_at (ix_exceptions_updated_at), and the
    number and total version of the rows updated within CHANGE_WINDOW of it (one short range of
    that index, index-only). Every write of an exception bumps updated_at and version, so a
    transaction that committed late with an older updated_at still moves the window's figures.
    counts: the summary's time, or the current minute when counts are live (SLA statuses move
    with the clock even when no row does).
    """
    now = now or utcnow()
    last_id, last_update = session.execute(
        sa.select(sa.func.max(ExceptionItem.id), sa.func.max(ExceptionItem.updated_at))
    ).one()
    window = (0, 0)
    if last_update is not None:
        window = session.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ExceptionItem.version), 0)).where(
                ExceptionItem.updated_at >= last_update - CHANGE_WINDOW
            )
        ).one()
    rows = f"{last_id}|{last_update.isoformat() if last_update else ''}|{window[0]}|{window[1]}"
    source = count_source(session, now)
    counts = source.as_of.isoformat() if not source.live else now.strftime("%Y-%m-%dT%H:%M")
    return f"{_digest(rows)}.{_digest(counts)}"


def _digest(text: str) -> str:
    return hashlib.blake2s(text.encode(), digest_size=6).hexdigest()
