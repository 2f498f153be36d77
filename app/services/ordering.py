"""Ordering per patient on sequence-sensitive connections (issue 6, "Faults").

On a connection marked `sequence_sensitive`, a later message for a patient waits behind an
unresolved earlier one: earlier = accepted earlier on the same connection (created_at, then id);
unresolved = not delivered and not discarded (queued, being delivered, retrying, in a human queue,
replaying). Its queued attempt is not claimed but *held* (`attempts.held_behind` = the blocker's
message id, detail "held: waiting behind …"); nothing is sent and no retry is spent. When the
blocker is delivered or discarded, `release_waiting` gives each attempt held behind it a new job,
in attempt order; a released attempt looks again and may wait behind the next earlier message, so
a chain drains one by one, in order. `release_unblocked` (every due-retries pass) releases any whose
blocker was settled by a path without the hook. The patient is the message's FHIR subject/patient
reference, or for HL7 v2 its first PID-3 identifier.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.cas import cas_update
from app.db.models import Attempt, ExceptionItem, Message, MessageIdentifier, OutboxEntry
from app.domain.delivery import deliver_job_id
from app.domain.states import AttemptState, ExceptionState, MessageState

from . import audit
from .clock import utcnow

RESOLVED = (MessageState.DELIVERED, MessageState.DISCARDED)


def patient_key(s: so.Session, message: Message) -> str | None:
    """The patient a message is about, as ordering compares it (None: no ordering possible)."""
    if message.patient_ref:
        return message.patient_ref
    return s.scalar(
        sa.select(MessageIdentifier.value)
        .where(MessageIdentifier.message_id == message.id, MessageIdentifier.kind == "patient_id")
        .order_by(MessageIdentifier.id)
        .limit(1)
    )


def blocker_of(s: so.Session, message: Message) -> Message | None:
    """The latest earlier unresolved message for the same patient on this message's connection,
    when the connection is sequence-sensitive; else None."""
    if not message.connection.sequence_sensitive:
        return None
    key = patient_key(s, message)
    if key is None:
        return None
    if message.patient_ref:
        same_patient = Message.patient_ref == key
    else:
        same_patient = Message.id.in_(
            sa.select(MessageIdentifier.message_id).where(
                MessageIdentifier.kind == "patient_id", MessageIdentifier.value == key
            )
        )
    return s.scalar(
        sa.select(Message)
        .where(
            Message.connection_id == message.connection_id,
            same_patient,
            sa.or_(
                Message.created_at < message.created_at,
                sa.and_(Message.created_at == message.created_at, Message.id < message.id),
            ),
            Message.status.not_in(RESOLVED),
        )
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(1)
    )


def waiting_reason(s: so.Session, blocker: Message) -> str:
    """ "waiting behind #N": the blocker's open exception if it has one, else its message id."""
    exception_id = s.scalar(
        sa.select(ExceptionItem.id)
        .where(ExceptionItem.message_id == blocker.id, ExceptionItem.state.not_in(list(_FINAL)))
        .order_by(ExceptionItem.id.desc())
        .limit(1)
    )
    what = f"#{exception_id}" if exception_id else f"message {blocker.id}"
    return f"held: waiting behind {what} (an earlier message for the same patient, {blocker.status})"


_FINAL = (ExceptionState.RESOLVED, ExceptionState.DISCARDED)


def hold_if_blocked(s: so.Session, attempt_id: int, message: Message) -> str | None:
    """Hold a queued attempt behind an unresolved earlier message of its patient. Returns the
    reason when it was held; None: go ahead.

    The blocker's row is locked and read again first, so a blocker settling at this very moment is
    either seen settled (go ahead) or settles after this commits and releases the hold."""
    blocker = blocker_of(s, message)
    while blocker is not None:
        fresh = s.get(Message, blocker.id, with_for_update=True, populate_existing=True)
        if fresh.status not in RESOLVED:
            break
        blocker = blocker_of(s, message)
    if blocker is None:
        return None
    reason = waiting_reason(s, blocker)
    if not cas_update(
        s,
        Attempt,
        attempt_id,
        expect={"outcome": AttemptState.QUEUED, "held_behind": None},
        values={"held_behind": blocker.id, "detail": reason},
    ):
        return None
    audit.record(
        s,
        actor="system:worker",
        action="message.held",
        subject_type="message",
        subject_id=message.id,
        reason=reason,
        details={"attempt_id": attempt_id, "waiting_behind": blocker.id},
    )
    return reason


def release_waiting(s: so.Session, message_id: str) -> int:
    """The blocker `message_id` was delivered or discarded: queue again, in order, every attempt
    held behind it (each looks again when it runs)."""
    now = utcnow()
    released = 0
    for attempt_id, held_message in s.execute(
        sa.select(Attempt.id, Attempt.message_id)
        .where(Attempt.held_behind == message_id, Attempt.outcome == AttemptState.QUEUED)
        .order_by(Attempt.id)
    ).all():
        if not cas_update(
            s,
            Attempt,
            attempt_id,
            expect={"outcome": AttemptState.QUEUED, "held_behind": message_id},
            values={"held_behind": None, "detail": ""},
        ):
            continue
        s.add(
            OutboxEntry(
                kind="deliver",
                ref_id=str(attempt_id),
                job_id=f"{deliver_job_id(attempt_id)}-released-{now:%Y%m%d%H%M%S%f}",
                created_at=now,
            )
        )
        audit.record(
            s,
            actor="system:worker",
            action="message.released",
            subject_type="message",
            subject_id=held_message,
            details={"attempt_id": attempt_id, "was_waiting_behind": message_id},
        )
        released += 1
    return released


def release_unblocked(s: so.Session, limit: int = 200) -> int:
    """Release held attempts whose blocker is settled but which nobody released (a path without
    the hook, a crash between the two). One range of ix_attempts_held_behind."""
    blockers = s.scalars(
        sa.select(Attempt.held_behind)
        .join(Message, Message.id == Attempt.held_behind)
        .where(Attempt.held_behind.is_not(None), Message.status.in_(RESOLVED))
        .distinct()
        .limit(limit)
    ).all()
    return sum(release_waiting(s, blocker) for blocker in blockers)


def held_attempts(s: so.Session, message_id: str) -> list[tuple[int, str, str]]:
    """(attempt id, the message it waits behind, the reason shown) for a message's held attempts."""
    return [
        (attempt_id, behind, detail)
        for attempt_id, behind, detail in s.execute(
            sa.select(Attempt.id, Attempt.held_behind, Attempt.detail)
            .where(Attempt.message_id == message_id, Attempt.held_behind.is_not(None))
            .order_by(Attempt.id)
        )
    ]
