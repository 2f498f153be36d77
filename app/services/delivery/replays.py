"""Approved replays: wait out any earlier uncertain request, claim, reconcile by identifier search,
deliver, settle (SPEC 2, 3.1)."""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.cas import cas_update
from app.db.models import Attempt, ExceptionItem, Message, OutboxEntry, Replay
from app.db.session import transaction
from app.domain.delivery import (
    TRANSIENT_NOT_APPLIED_STATUSES,
    UNCERTAIN_ATTEMPT_OUTCOMES,
    AttemptOutcome,
    Category,
    Outcome,
    reconcile_not_before,
)
from app.domain.states import AttemptState, ExceptionState, MessageState, ReplayState

from .. import connections, faults, ordering
from ..clock import utcnow
from ..exceptions import reopen
from .common import (
    Heartbeat,
    call,
    envelope_for,
    finish_attempt,
    gate,
    late_result,
    lock_connection,
    note_capability,
    note_circuit,
    resolve,
    set_message_status,
)
from .runtime import Runtime
from .versions import recheck_soon

log = logging.getLogger("recon.delivery")


def reconcile_window_end(s: so.Session, message_id: str, read_timeout: float, grace: float):
    """When the latest earlier attempt that may still be in the EHR's hands stops being so."""
    last_uncertain = s.scalar(
        sa.select(sa.func.max(Attempt.started_at)).where(
            Attempt.message_id == message_id,
            sa.or_(
                Attempt.outcome.in_(UNCERTAIN_ATTEMPT_OUTCOMES),
                sa.and_(
                    Attempt.outcome == AttemptState.TRANSIENT,
                    sa.func.coalesce(Attempt.category, "") != Category.TRANSPORT.value,
                    sa.func.coalesce(Attempt.status_code, 0).notin_(TRANSIENT_NOT_APPLIED_STATUSES),
                ),
            ),
        )
    )
    return reconcile_not_before(last_uncertain, read_timeout, grace)


def defer_replay(s: so.Session, replay_id: int, not_before, now) -> bool:
    """Leave a queued replay unclaimed until `not_before`: a new outbox row the relay releases then."""
    if not cas_update(
        s,
        Replay,
        replay_id,
        expect={"state": ReplayState.QUEUED},
        values={"state": ReplayState.QUEUED, "not_before": not_before},
    ):
        return False
    s.add(
        OutboxEntry(
            kind="replay",
            ref_id=str(replay_id),
            job_id=f"replay-{replay_id}-after-{not_before:%Y%m%d%H%M%S%f}",
            created_at=now,
            available_at=not_before,
        )
    )
    return True


def _defer_if_too_early(rt: Runtime, replay_id: int) -> str | None:
    """An earlier request of this message may still be in the EHR's hands (unknown outcome, a worker
    killed mid-call, a 5xx): a search now could miss a commit about to land, and a re-send would
    apply the order twice. Until that request's window closes, the replay is not claimed: it goes
    back to the outbox, released to the queue at the window's end — no worker waits meanwhile."""
    with transaction(rt.sessions) as s:
        replay = s.get(Replay, replay_id)
        if replay is None or replay.state != ReplayState.QUEUED:
            return None  # the claim below reports it
        message = s.get(Message, replay.message_id)
        not_before = reconcile_window_end(
            s, message.id, message.connection.read_timeout, rt.reconcile_grace_seconds
        )
        now = utcnow()
        # Nothing can reach the EHR while its circuit is open or another call probes it: the
        # replay waits (not failed, not sent) and runs when the circuit lets it.
        conn = message.connection
        if ordering.blocker_of(s, message) is not None:  # an earlier message of the patient first
            hold = now + timedelta(seconds=max(rt.housekeeping_seconds, 1.0))
            if not_before is None or hold > not_before:
                not_before = hold
        if connections.is_paused(conn, now):  # a maintenance window: wait for its end or a resume
            hold = conn.paused_until or now + timedelta(seconds=connections.PAUSE_RECHECK_SECONDS)
            if not_before is None or hold > not_before:
                not_before = hold
        if conn.circuit_open_until is not None:
            hold = conn.circuit_open_until
            if hold <= now and conn.circuit_probe_until is not None and conn.circuit_probe_until > now:
                hold = now + timedelta(seconds=2)
            if hold > now and (not_before is None or hold > not_before):
                not_before = hold
        if not_before is None or not_before <= now:
            return None
        if not defer_replay(s, replay_id, not_before, now):
            return None
    log.info(
        "replay %s deferred until %s UTC: an earlier request's window is open, or the circuit is",
        replay_id,
        f"{not_before:%H:%M:%S}",
        extra={"replay_id": replay_id},
    )
    return f"deferred until {not_before:%H:%M:%S} UTC"


def run_replay(rt: Runtime, replay_id: int) -> str:
    """Run one approved replay: wait out any earlier uncertain request, claim, reconcile by
    identifier search, deliver, settle."""
    deferred = _defer_if_too_early(rt, replay_id)
    if deferred:
        return deferred
    with transaction(rt.sessions) as s:
        claim = claim_replay(s, rt, replay_id)
        if claim is None:
            return "skipped: replay already claimed"
        attempt_id, message_id, corrected, envelope, message_type, conn = claim

    faults.checkpoint("claimed")
    found: bool | None = None
    contacted = False
    with Heartbeat(rt, attempt_id=attempt_id, replay_id=replay_id):
        # One gate for the search and the send: in half-open, this replay's search is the probe.
        outcome = gate(rt, conn, message_type)
        if outcome is None and conn.supports_identifier_search:
            found, outcome = _reconcile(rt, conn, envelope, replay_id, corrected)
        if outcome is None:
            outcome, contacted = call(rt, conn, envelope, message_type, gate_passed=True)
    faults.checkpoint("called")

    with transaction(rt.sessions) as s:
        return settle_replay(s, replay_id, attempt_id, message_id, outcome, contacted=contacted, found=found)


def claim_replay(s: so.Session, rt: Runtime, replay_id: int):
    """queued → running with a lease, and the replay's in-flight attempt. None: not queued."""
    now = utcnow()
    if not cas_update(
        s,
        Replay,
        replay_id,
        expect={"state": ReplayState.QUEUED},
        values={
            "state": ReplayState.RUNNING,
            "started_at": now,
            "worker": rt.worker_name,
            "lease_expires_at": now + timedelta(seconds=rt.lease_seconds),
        },
    ):
        return None
    replay = s.get(Replay, replay_id, populate_existing=True)
    message = s.get(Message, replay.message_id)
    attempt = Attempt(
        message_id=message.id,
        replay_id=replay.id,
        payload_version_id=replay.payload_version_id,
        trigger=f"replay:{replay.id}",
        started_at=now,
        outcome=AttemptState.IN_FLIGHT,
        lease_expires_at=replay.lease_expires_at,
    )
    s.add(attempt)
    s.flush()
    envelope = envelope_for(message, replay.payload_version)
    return attempt.id, message.id, replay.corrected, envelope, message.message_type, message.connection


def _reconcile(
    rt: Runtime, conn, envelope, replay_id: int, corrected: bool
) -> tuple[bool | None, Outcome | None]:
    """Ask the EHR for the delivery identifier first. (found, the outcome that settles the replay
    without sending — or None: not there, send it)."""
    try:
        found = rt.adapter_factory(conn).find_applied(envelope)
    except Exception:  # cannot tell
        log.exception("find_applied raised", extra={"replay_id": replay_id})
        found = None
    if found is None:
        return found, Outcome(
            AttemptOutcome.UNKNOWN,
            Category.UNKNOWN_OUTCOME,
            summary="search by identifier",
            detail="identifier search failed: cannot tell whether the EHR applied it; not re-sent",
        )
    if found and corrected:
        # The EHR holds the ORIGINAL payload: sending the correction would duplicate the order,
        # and resolving would record a correction the EHR never got. A human decides.
        return found, Outcome(
            AttemptOutcome.REJECTED,
            Category.DUPLICATE_SUSPECTED,
            summary="search by identifier",
            provably_not_applied=True,
            detail="the EHR already holds this order as first sent; the correction was not "
            "sent (amend it in the EHR, or discard as applied_manually)",
        )
    if found:
        return found, Outcome(
            AttemptOutcome.DELIVERED,
            summary="search by identifier",
            detail="found already applied by identifier search; not re-sent",
        )
    return found, None


def settle_replay(
    s: so.Session,
    replay_id: int,
    attempt_id: int,
    message_id: str,
    outcome: Outcome,
    *,
    contacted: bool,
    found: bool | None,
) -> str:
    """running → succeeded / failed, the attempt's result, and the exception resolved or reopened."""
    now = utcnow()
    result = (
        (outcome.detail or f"delivered {outcome.resource_ref or ''}".strip())
        if outcome.delivered
        else (outcome.detail or str(outcome.category))
    )[:2000]
    if not cas_update(
        s,
        Replay,
        replay_id,
        expect={"state": ReplayState.RUNNING},
        values={
            "state": ReplayState.SUCCEEDED if outcome.delivered else ReplayState.FAILED,
            "finished_at": now,
            "lease_expires_at": None,
            "result": result,
        },
    ):  # the reaper already declared it lost
        return late_result(s, attempt_id, message_id, outcome)
    finish_attempt(s, attempt_id, outcome)
    replay = s.get(Replay, replay_id, populate_existing=True)
    item = s.get(ExceptionItem, replay.exception_id)
    message = s.get(Message, message_id)
    conn = lock_connection(s, message.connection_id)
    if contacted:
        note_circuit(s, conn, outcome)
    note_capability(s, conn, outcome, message_id)
    if outcome.category is Category.CONFIG:  # version changed? the next scheduled pass looks
        recheck_soon(conn)
    if outcome.delivered:
        set_message_status(message, MessageState.DELIVERED)
        message.current_payload_id = replay.payload_version_id
        resolve(
            s,
            item,
            ExceptionState.REPLAYING,
            replay.result,
            actor="system:worker",
            details={
                "replay_id": replay_id,
                "attempt_id": attempt_id,
                "found_applied": bool(found),
                "resource": outcome.resource_ref,
            },
        )
        return "resolved"
    reopen(
        s,
        item,
        outcome.category or Category.UNKNOWN_OUTCOME,
        f"replay {replay_id} failed: {replay.result}",
        from_state=ExceptionState.REPLAYING,
        actor="system:worker",
        may_have_applied=not outcome.provably_not_applied,
    )
    return "reopened"
