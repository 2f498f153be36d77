"""The outbox as the relay reads it: rows whose time has come, the next deferred one, and marking
rows relayed (app/adapters/queue.py moves them into RQ)."""

from __future__ import annotations

import sqlalchemy as sa

from app.db.models import OutboxEntry
from app.db.session import transaction

from ..clock import utcnow
from .runtime import Runtime


def pending_outbox(rt: Runtime, limit: int = 200) -> list[OutboxEntry]:
    """Unrelayed outbox rows whose time has come (a deferred replay's row waits for its window)."""
    with transaction(rt.sessions) as s:
        return list(
            s.scalars(
                sa.select(OutboxEntry)
                .where(
                    OutboxEntry.relayed_at.is_(None),
                    sa.or_(OutboxEntry.available_at.is_(None), OutboxEntry.available_at <= utcnow()),
                )
                .order_by(OutboxEntry.id)
                .limit(limit)
            )
        )


def next_deferred_at(rt: Runtime):
    """When the earliest deferred outbox row becomes available (None: nothing deferred)."""
    with transaction(rt.sessions, read_only=True) as s:
        return s.scalar(
            sa.select(sa.func.min(OutboxEntry.available_at)).where(
                OutboxEntry.relayed_at.is_(None), OutboxEntry.available_at.is_not(None)
            )
        )


def mark_relayed(rt: Runtime, entry_ids: list[int]) -> None:
    if not entry_ids:
        return
    with transaction(rt.sessions) as s:
        s.execute(
            sa.update(OutboxEntry)
            .where(OutboxEntry.id.in_(entry_ids), OutboxEntry.relayed_at.is_(None))
            .values(relayed_at=utcnow())
        )
