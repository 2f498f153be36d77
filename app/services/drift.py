"""Drift, made visible: data-shape observations (app/domain/payloads.py DRIFT_KINDS) counted per
connection per hour, and the first sighting of each kind on a connection flagged until someone
acknowledges it. Recorded inside the intake transaction, so counts never disagree with messages."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.dialects import postgresql, sqlite

from app.db.models import Connection, DriftCount, DriftKind, ExceptionItem
from app.domain.payloads import DRIFT_KINDS, Observation
from app.services import audit

KIND_LABELS = {
    "decode_fallback": "not UTF-8, decoded by a fallback",
    "mojibake": "double-encoded text (mojibake)",
    "unknown_segment": "unknown HL7 segment",
    "z_segment": "custom Z-segment",
    "missing_required_field": "required field empty",
    "field_too_long": "field over its HL7 length",
    "bad_escape": "bad HL7 escape sequence",
    "unknown_code_system": "unexpected code system",
    "new_fhir_element": "element FHIR does not define",
    "capability_change": "CapabilityStatement changed",
}


def _insert(session: so.Session, model):
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def record(
    session: so.Session,
    connection_id: int,
    message_id: str | None,
    observations: tuple[Observation, ...] | list[Observation],
    now: datetime,
) -> None:
    """Count each kind once per message (a message with five Z-segments is one z_segment message)."""
    kinds: dict[str, Observation] = {}
    for obs in observations:
        if obs.kind in DRIFT_KINDS:
            kinds.setdefault(obs.kind, obs)
    if not kinds:
        return
    hour = hour_of(now)
    counts = _insert(session, DriftCount).values(
        [{"connection_id": connection_id, "kind": kind, "hour": hour, "count": 1} for kind in sorted(kinds)]
    )
    session.execute(
        counts.on_conflict_do_update(
            index_elements=["connection_id", "kind", "hour"], set_={"count": DriftCount.count + 1}
        )
    )
    first = _insert(session, DriftKind).values(
        [
            {
                "connection_id": connection_id,
                "kind": kind,
                "first_seen_at": now,
                "example_message_id": message_id,
                "where": obs.where[:200],
                "detail": obs.detail[:500],
            }
            for kind, obs in sorted(kinds.items())
        ]
    )
    session.execute(first.on_conflict_do_nothing(index_elements=["connection_id", "kind"]))


@dataclass(frozen=True)
class DriftFlag:
    id: int
    connection: str
    kind: str
    first_seen_at: datetime
    where: str
    detail: str
    example_exception_id: int | None
    count_24h: int


def open_flags(session: so.Session, now: datetime, limit: int = 20) -> list[DriftFlag]:
    """New kinds nobody has acknowledged, newest first, each with an example exception if one exists."""
    rows = session.execute(
        sa.select(DriftKind, Connection.name)
        .join(Connection, Connection.id == DriftKind.connection_id)
        .where(DriftKind.acknowledged_at.is_(None))
        .order_by(DriftKind.first_seen_at.desc(), DriftKind.id.desc())
        .limit(limit)
    ).all()
    if not rows:
        return []
    since = hour_of(now) - timedelta(hours=23)
    recent = Counter()
    for conn_id, kind, n in session.execute(
        sa.select(DriftCount.connection_id, DriftCount.kind, sa.func.sum(DriftCount.count))
        .where(DriftCount.hour >= since)
        .group_by(DriftCount.connection_id, DriftCount.kind)
    ):
        recent[(conn_id, kind)] = int(n or 0)
    message_ids = [k.example_message_id for k, _ in rows if k.example_message_id]
    examples = (
        dict(
            session.execute(
                sa.select(ExceptionItem.message_id, sa.func.min(ExceptionItem.id))
                .where(ExceptionItem.message_id.in_(message_ids))
                .group_by(ExceptionItem.message_id)
            ).all()
        )
        if message_ids
        else {}
    )
    return [
        DriftFlag(
            kind.id,
            name,
            kind.kind,
            kind.first_seen_at,
            kind.where,
            kind.detail,
            examples.get(kind.example_message_id),
            recent[(kind.connection_id, kind.kind)],
        )
        for kind, name in rows
    ]


def open_flag_count(session: so.Session) -> int:
    return session.scalar(
        sa.select(sa.func.count()).select_from(DriftKind).where(DriftKind.acknowledged_at.is_(None))
    )


def acknowledge(session: so.Session, flag_id: int, actor: str, now: datetime) -> DriftKind | None:
    kind = session.get(DriftKind, flag_id)
    if kind is None or kind.acknowledged_at is not None:
        return kind
    kind.acknowledged_at, kind.acknowledged_by = now, actor
    audit.record(
        session,
        actor=actor,
        action="drift.acknowledge",
        subject_type="connection",
        subject_id=str(kind.connection_id),
        details={"kind": kind.kind, "first_seen_at": kind.first_seen_at.isoformat()},
    )
    return kind


def recent_by_connection(session: so.Session, now: datetime) -> list[tuple[str, str, int, int]]:
    """(connection, kind, last 24 h, last 7 days) for every kind seen on a connection this week."""
    hour = hour_of(now)
    day, week = hour - timedelta(hours=23), hour - timedelta(days=7) + timedelta(hours=1)
    rows = session.execute(
        sa.select(
            Connection.name,
            DriftCount.kind,
            sa.func.sum(sa.case((DriftCount.hour >= day, DriftCount.count), else_=0)),
            sa.func.sum(DriftCount.count),
        )
        .join(Connection, Connection.id == DriftCount.connection_id)
        .where(DriftCount.hour >= week)
        .group_by(Connection.name, DriftCount.kind)
        .order_by(Connection.name, DriftCount.kind)
    )
    return [(name, kind, int(d or 0), int(w or 0)) for name, kind, d, w in rows]


def counts_by_connection(session: so.Session) -> list[tuple[str, str, int]]:
    """All-time totals per connection and kind, for /metrics."""
    return [
        (name, kind, int(n or 0))
        for name, kind, n in session.execute(
            sa.select(Connection.name, DriftCount.kind, sa.func.sum(DriftCount.count))
            .join(Connection, Connection.id == DriftCount.connection_id)
            .group_by(Connection.name, DriftCount.kind)
            .order_by(Connection.name, DriftCount.kind)
        )
    ]


def series(session: so.Session, connection_id: int, since: datetime) -> list[tuple[datetime, str, int]]:
    """Hourly counts of one connection since a moment, oldest first."""
    return [
        (hour, kind, n)
        for hour, kind, n in session.execute(
            sa.select(DriftCount.hour, DriftCount.kind, DriftCount.count)
            .where(DriftCount.connection_id == connection_id, DriftCount.hour >= since)
            .order_by(DriftCount.hour, DriftCount.kind)
        )
    ]
