"""The lease reaper: replays and attempts whose worker died become `unknown_outcome` for a human —
never re-sent. Also the SLA escalation entry point the worker's housekeeping calls."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.cas import cas_update
from app.db.models import Attempt, ExceptionItem, Message, Replay
from app.db.session import transaction
from app.domain.delivery import Category
from app.domain.states import AttemptState, ExceptionState, MessageState, ReplayState

from .. import audit
from ..clock import utcnow
from ..exceptions import open_exception, reopen
from .common import set_message_status
from .runtime import Runtime


def expire_attempts(s: so.Session, now, *where) -> list[Attempt]:
    """Compare-and-set in_flight → unknown for the matching attempts; returns those it took."""
    taken = []
    for attempt in s.scalars(
        sa.select(Attempt).where(Attempt.outcome == AttemptState.IN_FLIGHT, *where)
    ).all():
        if cas_update(
            s,
            Attempt,
            attempt.id,
            expect={"outcome": AttemptState.IN_FLIGHT},
            values={
                "outcome": AttemptState.UNKNOWN,
                "category": Category.UNKNOWN_OUTCOME.value,
                "finished_at": now,
                "lease_expires_at": None,
                "detail": "worker lost mid-delivery",
            },
        ):
            taken.append(attempt)
    return taken


def reap_expired_leases(rt: Runtime) -> int:
    """Replays and attempts whose worker died become `unknown_outcome` for a human — never re-sent."""
    reaped = 0
    with transaction(rt.sessions) as s:
        now = utcnow()
        for replay in s.scalars(
            sa.select(Replay).where(Replay.state == ReplayState.RUNNING, Replay.lease_expires_at < now)
        ).all():
            if not cas_update(
                s,
                Replay,
                replay.id,
                expect={"state": ReplayState.RUNNING},
                values={
                    "state": ReplayState.LOST,
                    "finished_at": now,
                    "lease_expires_at": None,
                    "result": "worker lost mid-delivery: outcome unknown",
                },
            ):
                continue
            expire_attempts(s, now, Attempt.replay_id == replay.id)
            item = s.get(ExceptionItem, replay.exception_id)
            audit.record(
                s,
                actor="system:reaper",
                action="replay.lease_expired",
                subject_type="replay",
                subject_id=replay.id,
                from_state=ReplayState.RUNNING.value,
                to_state=ReplayState.LOST.value,
                details={"worker": replay.worker},
            )
            reopen(
                s,
                item,
                Category.UNKNOWN_OUTCOME,
                f"replay {replay.id} lost its worker ({replay.worker}) mid-delivery: the EHR may or may not "
                "have applied it",
                from_state=ExceptionState.REPLAYING,
                actor="system:reaper",
            )
            reaped += 1
        for attempt in expire_attempts(s, now, Attempt.replay_id.is_(None), Attempt.lease_expires_at < now):
            message = s.get(Message, attempt.message_id)
            set_message_status(message, MessageState.EXCEPTION)
            detail = (
                f"attempt {attempt.id} lost its worker mid-delivery: the EHR may or may not have applied it"
            )
            item = s.scalar(
                sa.select(ExceptionItem).where(
                    ExceptionItem.message_id == message.id, ExceptionItem.state == ExceptionState.RETRYING
                )
            )
            audit.record(
                s,
                actor="system:reaper",
                action="attempt.lease_expired",
                subject_type="message",
                subject_id=message.id,
                details={"attempt_id": attempt.id},
            )
            if item is not None:
                reopen(
                    s,
                    item,
                    Category.UNKNOWN_OUTCOME,
                    detail,
                    from_state=ExceptionState.RETRYING,
                    actor="system:reaper",
                )
            else:
                open_exception(
                    s,
                    message,
                    Category.UNKNOWN_OUTCOME,
                    detail,
                    payload_version_id=attempt.payload_version_id,
                    actor="system:reaper",
                )
            reaped += 1
    return reaped


def escalate_breached(rt: Runtime) -> int:
    """Escalate open items past their SLA (one transaction)."""
    from ..exceptions import escalate_breached as escalate

    with transaction(rt.sessions) as s:
        return escalate(s)
