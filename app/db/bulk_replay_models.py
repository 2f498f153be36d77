"""Tables of bulk replay (issue 6; app/domain/bulk_replay.py has the rules, migration 0012).

* `bulk_replays` — one batch: its fixed list's size, who requested and approved it, its state,
  its pace, and the version every human decision compares-and-sets.
* `bulk_replay_items` — one row per listed exception, in the order listed: held until the pacing
  step releases it (creates its replay and outbox row, `release_at` its slot), then it follows
  that replay. The database is the schedule; RQ only carries the released replays.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from .models import Base, User


class BulkReplay(Base):
    __tablename__ = "bulk_replays"
    __table_args__ = (sa.Index("ix_bulk_replays_state", "state", "id"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    state: so.Mapped[str] = so.mapped_column(sa.String(20))
    version: so.Mapped[int] = so.mapped_column(default=1)
    total: so.Mapped[int]
    reason: so.Mapped[str] = so.mapped_column(sa.Text)
    pace_count: so.Mapped[int]
    pace_seconds: so.Mapped[float]
    requested_by_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"))
    requested_at: so.Mapped[datetime]
    approved_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    approved_at: so.Mapped[datetime | None]
    # the latest human decision after the request (approve/reject/pause/resume/cancel)
    decided_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    decided_at: so.Mapped[datetime | None]
    decision_reason: so.Mapped[str | None] = so.mapped_column(sa.Text)
    started_at: so.Mapped[datetime | None]
    finished_at: so.Mapped[datetime | None]
    updated_at: so.Mapped[datetime]
    requested_by: so.Mapped[User] = so.relationship(foreign_keys=[requested_by_id])
    approved_by: so.Mapped[User | None] = so.relationship(foreign_keys=[approved_by_id])
    decided_by: so.Mapped[User | None] = so.relationship(foreign_keys=[decided_by_id])


class BulkReplayItem(Base):
    __tablename__ = "bulk_replay_items"
    __table_args__ = (
        sa.UniqueConstraint("bulk_replay_id", "exception_id", name="uq_bulk_replay_items_exception"),
        # The pacing step: a batch's next held items of one connection, in listed order.
        sa.Index("ix_bulk_replay_items_next", "bulk_replay_id", "state", "connection_id", "position"),
        # Released items whose replay may have ended (the pacing step settles them).
        sa.Index("ix_bulk_replay_items_state", "state", "bulk_replay_id"),
        # A connection's latest release across batches (where its next slot starts).
        sa.Index("ix_bulk_replay_items_slot", "connection_id", "release_at"),
    )
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    bulk_replay_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("bulk_replays.id"))
    position: so.Mapped[int]
    exception_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("exceptions.id"), index=True)
    connection_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("connections.id"))
    state: so.Mapped[str] = so.mapped_column(sa.String(20))
    release_at: so.Mapped[datetime | None]
    replay_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("replays.id"), unique=True)
    finished_at: so.Mapped[datetime | None]
    note: so.Mapped[str | None] = so.mapped_column(sa.String(500))
