"""Housekeeping steps shared by all workers: each runs once per interval, by whichever worker wins.

A row per step in `housekeeping_tasks`; a worker due to run a step first claims it with a
compare-and-set (`UPDATE … SET last_run_at = now, holder = me WHERE name = ? AND (last_run_at IS
NULL OR last_run_at <= now - interval)`) and runs it only when its update counted. Nothing is held
while the step runs, so a worker that dies mid-step blocks no one: the next interval's winner runs
it again (every step is safe to repeat — claims are compare-and-set). A live worker checks every
housekeeping pass, so with any worker alive a step due at t runs before t + one pass.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.session import transaction
from app.db.summary_models import HousekeepingTask

from .clock import utcnow


def due(sessions: so.sessionmaker, intervals: dict[str, float], now: datetime | None = None) -> list[str]:
    """The steps whose interval has passed since anyone last ran them (a read; claims nothing)."""
    now = now or utcnow()
    with transaction(sessions, read_only=True) as s:
        last = dict(
            s.execute(
                sa.select(HousekeepingTask.name, HousekeepingTask.last_run_at).where(
                    HousekeepingTask.name.in_(list(intervals))
                )
            ).all()
        )
    return [
        name
        for name, every in intervals.items()
        if name not in last or last[name] is None or last[name] <= now - timedelta(seconds=every)
    ]


def claim(
    sessions: so.sessionmaker, intervals: dict[str, float], holder: str, now: datetime | None = None
) -> list[str]:
    """Claim every step in `intervals` that is due; returns the ones this caller won (at most one
    caller wins a step per interval)."""
    now = now or utcnow()
    candidates = due(sessions, intervals, now)
    if not candidates:
        return []
    won = []
    with transaction(sessions) as s:
        for name in candidates:
            cutoff = now - timedelta(seconds=intervals[name])
            taken = s.execute(
                sa.update(HousekeepingTask)
                .where(
                    HousekeepingTask.name == name,
                    sa.or_(HousekeepingTask.last_run_at.is_(None), HousekeepingTask.last_run_at <= cutoff),
                )
                .values(last_run_at=now, holder=holder)
                .execution_options(synchronize_session=False)
            ).rowcount
            if taken == 1:
                won.append(name)
                continue
            exists = s.scalar(sa.select(sa.func.count()).where(HousekeepingTask.name == name))
            if not exists:  # a step newer than the database's rows: its first winner adds it
                try:
                    with s.begin_nested():
                        s.add(HousekeepingTask(name=name, last_run_at=now, holder=holder))
                    won.append(name)
                except sa.exc.IntegrityError:
                    pass  # another worker added it first: theirs this time
    return won
