"""Audit log writer, verifier and streaming reader (SPEC 6).

`record` must be called inside the transaction of the state change it records.
Writers serialize on the chain head row (FOR UPDATE on PostgreSQL; SQLite's
BEGIN IMMEDIATE already serializes writers).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import AuditEvent, AuditHead
from app.domain.audit_chain import VerifyResult, chain_hash, verify_chain

from .clock import utcnow


def record(
    session: so.Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str | int,
    from_state: str | None = None,
    to_state: str | None = None,
    reason: str | None = None,
    reason_code: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain in the caller's transaction."""
    head = session.info.get("audit_head")
    if head is None:
        # Lock the head once per transaction; later events in it extend the chain in memory.
        head = session.execute(sa.select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
        session.info["audit_head"] = head
    event = AuditEvent(
        id=head.last_id + 1,
        occurred_at=utcnow(),
        actor=actor,
        action=action,
        subject_type=subject_type,
        subject_id=str(subject_id),
        from_state=from_state,
        to_state=to_state,
        reason=reason,
        reason_code=reason_code,
        details=details or {},
        prev_hash=head.last_hash,
    )
    event.hash = chain_hash(head.last_hash, event.as_dict())
    session.add(event)
    head.last_id = event.id
    head.last_hash = event.hash
    return event


def iter_events(
    session: so.Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    subject_type: str | None = None,
    subject_id: str | None = None,
    after_id: int = 0,
    limit: int | None = None,
    batch: int = 500,
) -> Iterator[AuditEvent]:
    """Events oldest first, fetched in keyset batches so memory stays constant."""
    yielded = 0
    last = after_id
    while True:
        stmt = sa.select(AuditEvent).where(AuditEvent.id > last)
        if since:
            stmt = stmt.where(AuditEvent.occurred_at >= since)
        if until:
            stmt = stmt.where(AuditEvent.occurred_at < until)
        if actor:
            stmt = stmt.where(AuditEvent.actor == actor)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        if subject_type:
            stmt = stmt.where(AuditEvent.subject_type == subject_type)
        if subject_id:
            stmt = stmt.where(AuditEvent.subject_id == str(subject_id))
        size = batch if limit is None else min(batch, limit - yielded)
        rows = session.scalars(stmt.order_by(AuditEvent.id).limit(size)).all()
        for row in rows:
            yield row
            session.expunge(row)
        yielded += len(rows)
        if len(rows) < size or (limit is not None and yielded >= limit):
            return
        last = rows[-1].id


def _chain_rows(session: so.Session, batch: int = 2000) -> Iterator[dict]:
    """All events as plain dicts, oldest first, in keyset batches (no ORM objects: verify is hot)."""
    table = AuditEvent.__table__
    last = 0
    while True:
        rows = session.execute(
            sa.select(table).where(table.c.id > last).order_by(table.c.id).limit(batch)
        ).mappings()
        count = 0
        for row in rows:
            count += 1
            last = row["id"]
            yield dict(row)
        if count < batch:
            return


def verify(session: so.Session) -> VerifyResult:
    """Recompute the whole chain and compare its end with the stored head."""
    result = verify_chain(_chain_rows(session))
    if not result.ok:
        return result
    head = session.get(AuditHead, 1)
    if head is not None and (head.last_id != result.count or head.last_hash != result.head):
        return VerifyResult(
            False, result.count, result.head, head.last_id, "chain head does not match the last event"
        )
    return result


def head(session: so.Session) -> AuditHead:
    return session.get(AuditHead, 1)
