"""The working set: exception rows that are not final. Every partial index over exceptions is
declared WHERE <ACTIVE_SQL>, and every query meant to use one repeats that predicate word for word
(`active_clause()`), which is what both PostgreSQL and SQLite need to prove the index applies.

A fixed list, not derived from app.domain.states, because an index predicate is schema: changing
it is a migration (tests/unit/test_active_indexes.py checks it still matches the domain).
"""

from __future__ import annotations

import sqlalchemy as sa

ACTIVE_STATES: tuple[str, ...] = ("open", "retrying", "escalated", "pending_approval", "replaying")
ACTIVE_SQL = "state IN ('open', 'retrying', 'escalated', 'pending_approval', 'replaying')"


def active_where() -> sa.TextClause:
    """The partial-index predicate, for Index(..., postgresql_where=..., sqlite_where=...)."""
    return sa.text(ACTIVE_SQL)


def literal_states(column: sa.ColumnElement, states) -> sa.ColumnElement[bool]:
    """`column IN ('a', 'b')` with the values written into the SQL (not bound parameters), so the
    planner sees the same predicate as the index's when it plans — also for prepared statements,
    whose generic plans know nothing of parameter values."""
    states = list(states)
    if len(states) == 1:
        return column == sa.literal(states[0], literal_execute=True)
    return column.in_([sa.literal(v, literal_execute=True) for v in states])


def state_in(column: sa.ColumnElement, states, dialect: str) -> sa.ColumnElement[bool]:
    """A state filter the partial indexes can serve.

    PostgreSQL proves `state = 'open'` implies the active predicate by itself. SQLite only uses a
    partial index when the query repeats the index's WHERE term exactly, so there a filter on
    some active states also carries the whole active predicate (redundant, and harmless).
    """
    states = [s for s in dict.fromkeys(states)]
    narrow = literal_states(column, states)
    if dialect == "sqlite" and set(states) < set(ACTIVE_STATES):
        # Narrow term first: SQLite then still costs the multi-column indexes by their state column.
        return sa.and_(narrow, literal_states(column, ACTIVE_STATES))
    if set(states) == set(ACTIVE_STATES):
        return literal_states(column, ACTIVE_STATES)  # the index's own order, word for word
    return narrow
