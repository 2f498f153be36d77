"""Tables of the read side's summaries and of the worker's shared housekeeping schedule.

Kept apart from app/db/models.py (the domain's tables); they share its metadata.

* `exception_counts` — active exceptions per (category, state, customer, connection, SLA status)
  as of `read_summaries.counts_as_of`: what the queue counts and the dashboard show.
* `read_summaries` — one row (id 1): when the counts were taken and their rollups (per-queue
  totals, the dashboard's matrix and per-connection rows), and the dashboard's trend series and
  24-hour throughput with their own time.
* `housekeeping_tasks` — one row per scheduled housekeeping step: who ran it last and when. A
  worker runs a step only after winning a compare-and-set on `last_run_at`, so each step runs
  once per interval across all workers, not once per pass of every worker.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from .models import Base


class ExceptionCount(Base):
    __tablename__ = "exception_counts"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    category: so.Mapped[str] = so.mapped_column(sa.String(30))
    state: so.Mapped[str] = so.mapped_column(sa.String(20))
    customer_id: so.Mapped[int]
    connection_id: so.Mapped[int]
    sla_status: so.Mapped[str] = so.mapped_column(sa.String(10))
    n: so.Mapped[int]
    oldest_created_at: so.Mapped[datetime | None]


class ReadSummary(Base):
    __tablename__ = "read_summaries"
    id: so.Mapped[int] = so.mapped_column(primary_key=True, autoincrement=False)
    counts_as_of: so.Mapped[datetime | None]
    refresh_ms: so.Mapped[int] = so.mapped_column(default=0)
    trends_as_of: so.Mapped[datetime | None]
    trends: so.Mapped[dict | None] = so.mapped_column(sa.JSON)
    # The counts' rollups, taken with them (migration 0014): see app/services/summaries.py.
    rollups: so.Mapped[dict | None] = so.mapped_column(sa.JSON)


class HousekeepingTask(Base):
    __tablename__ = "housekeeping_tasks"
    name: so.Mapped[str] = so.mapped_column(sa.String(40), primary_key=True)
    last_run_at: so.Mapped[datetime | None]
    holder: so.Mapped[str | None] = so.mapped_column(sa.String(120))
