"""Saved queue views (issue 8): a name for the filters a person keeps coming back to, kept for
themselves or shared with everyone who works the queues."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import SavedView, User
from app.domain.errors import Conflict, Forbidden, Invalid, NotFound

from . import audit
from .clock import utcnow
from .queries import FILTERS, QUEUES

MAX_NAME = 80
MAX_QUERY = 1000
MAX_PER_USER = 50


@dataclass(frozen=True)
class ViewLink:
    id: int
    name: str
    queue: str
    query: str
    shared: bool
    owner: str
    mine: bool

    @property
    def url(self) -> str:
        return f"/queues/{self.queue}" + (f"?{self.query}" if self.query else "")


def filter_query(args) -> str:
    """The filter part of a queue URL, in a fixed order: no cursor, no page size, nothing else."""
    pairs = (
        [(k, v) for k, v in parse_qsl(args, keep_blank_values=False)]
        if isinstance(args, str)
        else [(k, v) for k in FILTERS for v in args.getlist(k)]
    )
    kept = [(k, v.strip()) for k, v in pairs if k in FILTERS and v and v.strip()]
    kept.sort(key=lambda kv: FILTERS.index(kv[0]))
    return urlencode(kept)


def save_view(session: so.Session, owner: User, name: str, queue: str, query: str, shared: bool) -> SavedView:
    """Save (or replace) `owner`'s view called `name`. Invalid: bad name/queue; Conflict: too many."""
    name = " ".join((name or "").split())
    if not name or len(name) > MAX_NAME:
        raise Invalid(f"a view needs a name of 1 to {MAX_NAME} characters", code="invalid_name")
    if queue not in QUEUES:
        raise Invalid(f"no queue named {queue!r}", code="invalid_queue")
    query = filter_query(query)
    if len(query) > MAX_QUERY:
        raise Invalid("these filters are too long to save", code="invalid_query")
    view = session.scalar(sa.select(SavedView).where(SavedView.owner_id == owner.id, SavedView.name == name))
    if view is None:
        mine = session.scalar(sa.select(sa.func.count()).where(SavedView.owner_id == owner.id)) or 0
        if mine >= MAX_PER_USER:
            raise Conflict(f"you have {MAX_PER_USER} saved views; delete one first", code="too_many_views")
        view = SavedView(owner_id=owner.id, name=name, created_at=utcnow())
        session.add(view)
    view.queue, view.query, view.shared = queue, query, bool(shared)
    session.flush()
    if shared:
        # Others will see it in their sidebar: who shared what is on the record.
        audit.record(
            session,
            actor=owner.username,
            action="saved_view.share",
            subject_type="saved_view",
            subject_id=view.id,
            details={"name": name, "queue": queue, "query": query},
        )
    return view


def visible_views(session: so.Session, user: User) -> list[ViewLink]:
    """The user's own views, then the views others shared, each by name."""
    rows = session.execute(
        sa.select(SavedView, User.username)
        .join(User, User.id == SavedView.owner_id)
        .where(sa.or_(SavedView.owner_id == user.id, SavedView.shared.is_(True)))
        .order_by(SavedView.owner_id != user.id, SavedView.name, SavedView.id)
    ).all()
    return [
        ViewLink(v.id, v.name, v.queue, v.query, v.shared, owner, v.owner_id == user.id) for v, owner in rows
    ]


def delete_view(session: so.Session, user: User, view_id: int) -> None:
    """Only its owner deletes a view (a shared one too)."""
    view = session.get(SavedView, view_id)
    if view is None:
        raise NotFound("no such saved view")
    if view.owner_id != user.id:
        raise Forbidden("only the person who saved a view can delete it", code="not_owner")
    session.delete(view)
