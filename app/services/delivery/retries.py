"""Automatic retries: the scheduler queues an attempt for each retrying item whose time has come."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.active import literal_states
from app.db.cas import cas_update
from app.db.models import Attempt, ExceptionItem, OutboxEntry
from app.db.session import transaction
from app.domain.delivery import deliver_job_id
from app.domain.states import AttemptState, ExceptionState

from .. import connections, ordering
from ..clock import utcnow
from .runtime import Runtime


def queue_retry(s: so.Session, item: ExceptionItem) -> Attempt | None:
    """Claim one due retry (compare-and-set on its state and next_retry_at) and queue its attempt
    through the outbox. None: another scheduler took it first."""
    now = utcnow()
    if not cas_update(
        s,
        ExceptionItem,
        item.id,
        expect={"state": ExceptionState.RETRYING, "next_retry_at": item.next_retry_at},
        values={"next_retry_at": None, "retry_count": ExceptionItem.retry_count + 1, "updated_at": now},
        bump_version=True,
        refresh=item,
    ):
        return None
    message = item.message
    attempt = Attempt(
        message_id=message.id,
        payload_version_id=message.current_payload_id,
        trigger=f"auto_retry:{item.retry_count}",
        started_at=now,
        outcome=AttemptState.QUEUED,
    )
    s.add(attempt)
    s.flush()
    s.add(
        OutboxEntry(kind="deliver", ref_id=str(attempt.id), job_id=deliver_job_id(attempt.id), created_at=now)
    )
    return attempt


def end_expired_pauses(rt: Runtime) -> int:
    """Maintenance windows whose `until` has passed end (audited, held items released) before
    the scheduler looks for due retries."""
    with transaction(rt.sessions) as s:
        return connections.end_expired_pauses(s, utcnow())


def schedule_due_retries(rt: Runtime, limit: int = 100) -> int:
    """Queue an attempt for every retrying exception whose time has come."""
    queued = 0
    with transaction(rt.sessions) as s:
        now = utcnow()
        # One range of ix_exceptions_retry_due (next_retry_at, id) WHERE state = 'retrying': the
        # state written into the SQL so the planner can match the index predicate.
        due = s.scalars(
            sa.select(ExceptionItem)
            .where(
                literal_states(ExceptionItem.state, [ExceptionState.RETRYING.value]),
                ExceptionItem.next_retry_at <= now,
            )
            .order_by(ExceptionItem.next_retry_at, ExceptionItem.id)
            .limit(limit)
        ).all()
        for item in due:
            if queue_retry(s, item) is not None:
                queued += 1
        # held attempts whose earlier message settled by a path without the release hook
        queued += ordering.release_unblocked(s)
    return queued
