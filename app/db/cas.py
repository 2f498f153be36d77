"""One compare-and-set: `UPDATE … WHERE id = ? AND <expected values>`, and whether it took.

Every claim and every settle in the product is one of these (docs/ARCHITECTURE.md "Concurrency on
two databases"): SQLite ignores `FOR UPDATE SKIP LOCKED`, and under PostgreSQL's READ COMMITTED the
loser re-evaluates the WHERE after the winner commits and updates nothing — so the row count says
who won on both. When the update names both the expected and the new state, the move is checked
against the state tables first (app/domain/states.py `check_transition`): an illegal move is a bug
and raises, whatever the row holds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.domain.states import StateKind, check_transition

from .models import Attempt, ExceptionItem, Message, Replay

# The column that holds each stored state, and which state table governs it.
STATE_COLUMNS: dict[type, tuple[StateKind, str]] = {
    ExceptionItem: (StateKind.EXCEPTION, "state"),
    Replay: (StateKind.REPLAY, "state"),
    Attempt: (StateKind.ATTEMPT, "outcome"),
    Message: (StateKind.MESSAGE, "status"),
}


def _criterion(column: sa.ColumnElement, expected: Any) -> sa.ColumnElement:
    if expected is None:
        return column.is_(None)
    if isinstance(expected, Collection) and not isinstance(expected, str):
        return column.in_(list(expected))
    return column == expected


def cas_update(
    session: so.Session,
    model: type,
    ident: Any,
    *,
    expect: Mapping[str, Any],
    values: Mapping[str, Any],
    where: tuple[sa.ColumnElement, ...] = (),
    bump_version: bool = False,
    refresh: object | None = None,
) -> bool:
    """Set `values` on row `ident` of `model` only while its columns hold `expect` (a value, None,
    or a collection meaning "one of"), plus any extra `where` criteria. True when it took.

    bump_version: also `version = version + 1` (exceptions). refresh: an ORM object to reload when
    it took (the session's copy is otherwise stale: the update bypasses it)."""
    governed = STATE_COLUMNS.get(model)
    if governed is not None:
        kind, column = governed
        if column in values and column in expect:
            expected = expect[column]
            for from_state in (
                expected if isinstance(expected, Collection) and not isinstance(expected, str) else [expected]
            ):
                check_transition(kind, from_state, values[column])
    new_values = dict(values)
    if bump_version:
        new_values["version"] = model.version + 1
    stmt = (
        sa.update(model)
        .where(
            model.id == ident, *(_criterion(getattr(model, name), v) for name, v in expect.items()), *where
        )
        .values(**new_values)
        .execution_options(synchronize_session=False)
    )
    took = session.execute(stmt).rowcount == 1
    if took and refresh is not None:
        session.refresh(refresh)
    return took
