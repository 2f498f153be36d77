"""The read side's summaries, refreshed by one worker at a time.

`refresh` counts the active exceptions per (category, state, customer, connection, SLA status) —
one pass over the active rows through the partial indexes, never the history — in a read-only
transaction, then replaces `exception_counts` in one short write transaction. Every
refresh also stores the counts' rollups (per-queue totals, the dashboard's matrix and
per-connection rows, `queries.rollups`), so a page reads them in one row rather than aggregating
thousands of groups per view. Every `TRENDS_SECONDS` it also recomputes the dashboard's hourly series and 24-hour throughput. The queue
counts and the dashboard read these (app/services/queries.py `count_source`), so they agree with
each other and cost the same at a thousand rows or a million; they show their time ("counts as of
10:42:05") and are at most one refresh interval old while a worker runs.

Which worker refreshes: the one that wins the `summaries` row of the housekeeping schedule
(app/services/schedule.py). Two refreshes can still overlap (a slow one past its interval): the
write locks the `read_summaries` row and never replaces newer counts with older ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.session import transaction
from app.db.summary_models import ExceptionCount, ReadSummary

from . import queries
from .clock import utcnow

TRENDS_SECONDS = 60.0  # the series have hourly points: once a minute is plenty


def refresh_seconds() -> float:
    """How often one worker refreshes the counts (RECON_SUMMARY_SECONDS, default 15)."""
    return float(os.environ.get("RECON_SUMMARY_SECONDS", "15"))


@dataclass
class RefreshResult:
    as_of: datetime
    groups: int
    trends: bool
    written: bool
    milliseconds: int


def refresh(
    sessions: so.sessionmaker, now: datetime | None = None, *, force_trends: bool = False
) -> RefreshResult:
    """Recount the summaries as of `now` (default: the clock)."""
    started = time.perf_counter()
    now = now or utcnow()
    with transaction(sessions, read_only=True) as s:
        if s.get_bind().dialect.name == "postgresql":
            # A few thousand groups over the active rows: hash them in memory rather than sort
            # the rows through temporary files (the default work_mem is 4 MB).
            s.execute(sa.text("SET LOCAL work_mem = '64MB'"))
        groups = [dict(row._mapping) for row in s.execute(queries.active_groups(s, now))]
        trends_as_of = s.scalar(sa.select(ReadSummary.trends_as_of).where(ReadSummary.id == 1))
        trends = None
        if (
            force_trends
            or trends_as_of is None
            or not 0 <= (now - trends_as_of).total_seconds() < TRENDS_SECONDS
        ):
            trends = queries.compute_trends(s, now)
    with transaction(sessions) as s:
        summary = s.scalar(sa.select(ReadSummary).where(ReadSummary.id == 1).with_for_update())
        if summary is None:
            summary = ReadSummary(id=1, refresh_ms=0)
            s.add(summary)
        elif summary.counts_as_of is not None and summary.counts_as_of > now:
            # A refresh that started later has already written: keep its newer counts.
            return RefreshResult(now, len(groups), False, False, _ms(started))
        s.execute(sa.delete(ExceptionCount))
        if groups:
            s.execute(sa.insert(ExceptionCount), groups)
        summary.counts_as_of = now
        summary.rollups = queries.rollups(groups)
        summary.refresh_ms = _ms(started)
        if trends is not None:
            summary.trends_as_of = trends.as_of
            summary.trends = trends.to_json()
    return RefreshResult(now, len(groups), trends is not None, True, _ms(started))


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
