"""First delivery and automatic retries' attempts: claim → call → settle (SPEC 2, 3.1)."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.cas import cas_update
from app.db.models import Attempt, Connection, ExceptionItem, Message, PayloadVersion
from app.db.session import transaction
from app.domain.delivery import Category, Outcome, auto_retry_eligible, retry_delay
from app.domain.states import AttemptState, ExceptionState, MessageState

from .. import audit, connections, faults, ordering
from ..clock import utcnow
from ..exceptions import open_exception, reopen
from .common import (
    Heartbeat,
    call,
    envelope_for,
    finish_attempt,
    late_result,
    lock_connection,
    note_capability,
    note_circuit,
    resolve,
    set_message_status,
)
from .runtime import Runtime
from .versions import recheck_soon


def deliver_attempt(rt: Runtime, attempt_id: int) -> str:
    """Run one queued attempt (intake or automatic retry). Returns what happened."""
    with transaction(rt.sessions) as s:
        held = hold_if_out_of_order(s, attempt_id)
        if held:
            return held
        attempt = claim_attempt(s, rt, attempt_id)
        if attempt is None:
            return "skipped: attempt already claimed"
        message = s.get(Message, attempt.message_id)
        conn = message.connection
        envelope = envelope_for(message, s.get(PayloadVersion, attempt.payload_version_id))
        message_type, message_id = message.message_type, message.id

    faults.checkpoint("claimed")
    with Heartbeat(rt, attempt_id=attempt_id):
        outcome, contacted = call(rt, conn, envelope, message_type)
    faults.checkpoint("called")
    return settle_attempt(rt, attempt_id, message_id, outcome, contacted)


def hold_if_out_of_order(s: so.Session, attempt_id: int) -> str | None:
    """On a sequence-sensitive connection, a queued attempt whose message has an unresolved earlier
    one for the same patient is held, not claimed (app/services/ordering.py)."""
    row = s.execute(
        sa.select(Attempt.outcome, Attempt.held_behind, Attempt.detail, Attempt.message_id).where(
            Attempt.id == attempt_id
        )
    ).first()
    if row is None or row.outcome != AttemptState.QUEUED:
        return None  # the claim reports it
    if row.held_behind is not None:
        return f"skipped: {row.detail or 'held behind an earlier message'}"
    return ordering.hold_if_blocked(s, attempt_id, s.get(Message, row.message_id))


def claim_attempt(s: so.Session, rt: Runtime, attempt_id: int) -> Attempt | None:
    """queued → in_flight with a lease, and the message delivering. None: someone claimed it first."""
    now = utcnow()
    if not cas_update(
        s,
        Attempt,
        attempt_id,
        expect={"outcome": AttemptState.QUEUED},
        values={
            "outcome": AttemptState.IN_FLIGHT,
            "started_at": now,
            "lease_expires_at": now + timedelta(seconds=rt.lease_seconds),
        },
    ):
        return None
    attempt = s.get(Attempt, attempt_id, populate_existing=True)
    set_message_status(s.get(Message, attempt.message_id), MessageState.DELIVERING)
    return attempt


def settle_attempt(rt: Runtime, attempt_id: int, message_id: str, outcome: Outcome, contacted: bool) -> str:
    """Record a called attempt's result in one transaction (compare-and-set on in_flight)."""
    with transaction(rt.sessions) as s:
        if not finish_attempt(s, attempt_id, outcome):
            return late_result(s, attempt_id, message_id, outcome)
        attempt = s.get(Attempt, attempt_id)
        message = s.get(Message, message_id)
        conn = lock_connection(s, message.connection_id)
        if contacted:
            note_circuit(s, conn, outcome)
        note_capability(s, conn, outcome, message_id)
        if outcome.category is Category.CONFIG:  # version changed? the next scheduled pass looks
            recheck_soon(conn)
        item = s.scalar(
            sa.select(ExceptionItem).where(
                ExceptionItem.message_id == message.id, ExceptionItem.state == ExceptionState.RETRYING
            )
        )
        return settle_delivery(rt, s, message, conn, attempt, outcome, item)


def settle_delivery(
    rt: Runtime,
    s: so.Session,
    message: Message,
    conn: Connection,
    attempt: Attempt,
    outcome: Outcome,
    item: ExceptionItem | None,
) -> str:
    """Delivered → audited (and the retrying item resolved); a retryable failure or a held call →
    retrying with backoff; anything else → a human queue."""
    now = utcnow()
    if outcome.delivered:
        set_message_status(message, MessageState.DELIVERED)
        audit.record(
            s,
            actor="system:worker",
            action="message.deliver",
            subject_type="message",
            subject_id=message.id,
            details={"attempt_id": attempt.id, "resource": outcome.resource_ref, "trigger": attempt.trigger},
        )
        if item is not None:
            resolve(
                s,
                item,
                ExceptionState.RETRYING,
                "automatic retry delivered",
                actor="system:retry",
                details={"attempt_id": attempt.id},
            )
        return "delivered"

    set_message_status(message, MessageState.EXCEPTION)
    detail = outcome.detail or f"{outcome.category} ({outcome.status_code})"
    may_have_applied = not outcome.provably_not_applied
    retries_done = item.retry_count if item is not None else 0
    eligible = auto_retry_eligible(outcome, connections.settings_for(conn))
    if outcome.held or (eligible and retries_done < conn.max_auto_retries):
        refund = {}
        if outcome.held:
            # Never sent: the retry this attempt used is given back, and the item waits for the
            # circuit (held items drain oldest due first: schedule_due_retries' order).
            retries_done = max(retries_done - 1, 0)
            refund = {"retry_count": retries_done}
            next_at = held_until(conn, now, outcome)
        else:
            delay = retry_delay(
                conn.retry_backoff_seconds,
                retries_done,
                retry_after=outcome.retry_after_seconds,
                draw=rt.draw(),
                cap=rt.retry_cap_seconds,
            )
            if conn.circuit_open_until:
                delay = max(delay, (conn.circuit_open_until - now).total_seconds())
            next_at = now + timedelta(seconds=delay)
        if item is None:
            open_exception(
                s,
                message,
                outcome.category,
                detail,
                payload_version_id=attempt.payload_version_id,
                state=ExceptionState.RETRYING,
                next_retry_at=next_at,
                actor="system:worker",
                may_have_applied=may_have_applied,
            )
        elif cas_update(
            s,
            ExceptionItem,
            item.id,
            expect={"state": ExceptionState.RETRYING},
            values={
                "state": ExceptionState.RETRYING,
                "next_retry_at": next_at,
                "category": outcome.category.value,
                "detail": detail[:4000],
                "updated_at": now,
                **refund,
            },
            bump_version=True,
        ):
            audit.record(
                s,
                actor="system:retry",
                action="exception.retry_scheduled",
                subject_type="exception",
                subject_id=item.id,
                from_state=ExceptionState.RETRYING.value,
                to_state=ExceptionState.RETRYING.value,
                reason=detail[:500],
                details={
                    "next_retry_at": next_at.isoformat() + "Z",
                    "retry_count": retries_done,
                    "held": outcome.held,
                },
            )
        return "retrying"
    if item is None:
        open_exception(
            s,
            message,
            outcome.category,
            detail,
            payload_version_id=attempt.payload_version_id,
            actor="system:worker",
            may_have_applied=may_have_applied,
        )
    else:
        reopen(
            s,
            item,
            outcome.category,
            f"automatic retries stopped: {detail}",
            from_state=ExceptionState.RETRYING,
            actor="system:retry",
            may_have_applied=may_have_applied,
        )
    return "exception"


def held_until(conn: Connection, now, outcome: Outcome):
    """When a held item looks again: when the maintenance window or the circuit's cooldown ends,
    or shortly (half-open with another call probing). Resuming a paused connection makes its held
    items due at once."""
    if connections.is_paused(conn, now):
        return conn.paused_until or now + timedelta(seconds=connections.PAUSE_RECHECK_SECONDS)
    if conn.circuit_open_until and conn.circuit_open_until > now:
        return conn.circuit_open_until
    return now + timedelta(seconds=min(2.0, conn.connect_timeout + conn.read_timeout))
