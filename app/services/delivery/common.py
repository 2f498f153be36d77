"""Steps every delivery flow shares: the gate before a call, the call, the lease heartbeat, and the
bookkeeping after it (attempt result, breaker, capability drift, system resolve, late results)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.cas import cas_update
from app.db.models import Attempt, Connection, ExceptionItem, Message, PayloadVersion, Replay
from app.db.session import transaction
from app.domain.capability import capability_difference
from app.domain.delivery import AttemptOutcome, Category, Envelope, Outcome, routing_refusal
from app.domain.payloads import Observation
from app.domain.states import (
    AttemptState,
    ExceptionState,
    MessageState,
    ReplayState,
    StateKind,
    check_transition,
)

from .. import audit, connections, drift, ordering
from ..clock import utcnow
from .runtime import Runtime

log = logging.getLogger("recon.delivery")


def envelope_for(message: Message, payload: PayloadVersion) -> Envelope:
    return Envelope(
        message_id=message.id,
        message_type=message.message_type,
        content_type=message.content_type,
        payload=payload.text or "",
        delivery_system=message.delivery_system,
        delivery_value=message.idempotency_key,
        control_id=message.control_id,
    )


def set_message_status(message: Message, to: MessageState) -> None:
    """Move a message's status along the state table (raises on a move the table lacks). A message
    delivered releases what waits behind it on a sequence-sensitive connection."""
    if message.status != to:
        check_transition(StateKind.MESSAGE, message.status, to)
    message.status = to
    message.updated_at = utcnow()
    if to in ordering.RESOLVED and message.connection.sequence_sensitive:
        # (attempts held on a connection no longer sequence-sensitive: the due-retries sweep)
        ordering.release_waiting(so.object_session(message), message.id)


def held(detail: str) -> Outcome:
    """Not sent, and not a try: the item waits (circuit open, another probe in flight)."""
    return Outcome(
        AttemptOutcome.TRANSIENT,
        Category.EHR_UNAVAILABLE,
        provably_not_applied=True,
        held=True,
        detail=detail,
    )


def config_refusal(conn: Connection, message_type: str) -> Outcome | None:
    """The configuration reasons not to call: connection disabled, type not enabled, or the
    scheduled pinned-version check found another FHIR version."""
    refusal = routing_refusal(connections.settings_for(conn), message_type)
    if refusal:
        return Outcome(AttemptOutcome.REJECTED, Category.CONFIG, detail=refusal, provably_not_applied=True)
    if conn.version_mismatch:
        return Outcome(
            AttemptOutcome.REJECTED,
            Category.CONFIG,
            detail=f"pinned FHIR version check: {conn.version_mismatch}; not sent",
            provably_not_applied=True,
        )
    return None


def gate(rt: Runtime, conn: Connection, message_type: str) -> Outcome | None:
    """Reasons not to call the EHR at all: connection disabled, type not enabled (config), or the
    circuit open — or half-open with another worker's probe in flight (held: not a try)."""
    refused = config_refusal(conn, message_type)
    if refused is not None:
        return refused
    if connections.is_paused(conn):
        until = f" until {conn.paused_until:%Y-%m-%d %H:%M} UTC" if conn.paused_until else ""
        return held(
            f"held: {conn.name} paused for maintenance{until} ({conn.paused_reason}); "
            "not sent, no retry spent"
        )
    state = connections.circuit_state(conn)
    if state == "open":
        return held(
            f"held: circuit open for {conn.name} until {conn.circuit_open_until:%H:%M:%S} UTC "
            "(not sent; no retry spent)"
        )
    if state == "half_open" and not claim_probe(rt, conn):
        return held(
            f"held: circuit half-open for {conn.name}, another call is probing the EHR "
            "(not sent; no retry spent)"
        )
    return None


def claim_probe(rt: Runtime, conn: Connection) -> bool:
    """Half-open lets exactly one call through across all workers: compare-and-set on the
    connection row (the claim lapses after the call's own timeouts if its worker dies)."""
    now = utcnow()
    window = timedelta(seconds=conn.connect_timeout + conn.read_timeout + 5)
    with transaction(rt.sessions) as s:
        return cas_update(
            s,
            Connection,
            conn.id,
            expect={},
            values={"circuit_probe_until": now + window},
            where=(
                sa.or_(
                    Connection.circuit_open_until.is_(None),  # closed meanwhile: go ahead
                    sa.and_(
                        Connection.circuit_open_until <= now,
                        sa.or_(
                            Connection.circuit_probe_until.is_(None), Connection.circuit_probe_until < now
                        ),
                    ),
                ),
            ),
        )


def attempt_result_values(outcome: Outcome, *, late: bool = False) -> dict:
    """The columns an attempt's result fills."""
    detail = outcome.detail[:1900]
    if late:
        detail = f"late result, after the lease expired: {detail}"
    return {
        "outcome": AttemptState(outcome.outcome.value),
        "category": outcome.category.value if outcome.category else None,
        "status_code": outcome.status_code,
        "request_summary": outcome.summary[:1000],
        # A success echoes the resource (PHI) and proves nothing more than the status: keep errors only.
        "response_excerpt": "" if outcome.delivered else outcome.response_excerpt[:2000],
        "detail": detail,
        "issues": list(outcome.issues or []),
        "latency_ms": outcome.latency_ms,
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }


def finish_attempt(s: so.Session, attempt_id: int, outcome: Outcome) -> bool:
    """Compare-and-set in_flight → result. False: the reaper declared it lost first."""
    return cas_update(
        s,
        Attempt,
        attempt_id,
        expect={"outcome": AttemptState.IN_FLIGHT},
        values=attempt_result_values(outcome),
    )


def call(
    rt: Runtime, conn: Connection, envelope: Envelope, message_type: str, *, gate_passed: bool = False
) -> tuple[Outcome, bool]:
    """Deliver through the connection's adapter. Returns (outcome, whether the EHR was contacted).
    gate_passed: the caller already passed `gate` for this call (and may hold the probe)."""
    from app.adapters.ehr.errors import AdapterError

    gated = None if gate_passed else gate(rt, conn, message_type)
    if gated is not None:
        return gated, False
    adapter = rt.adapter_factory(conn)
    fetches = getattr(adapter, "capability_fetches", 0)
    try:
        outcome, contacted = adapter.deliver(envelope), True
    except AdapterError as exc:  # refused before anything was sent (configuration, validation)
        outcome, contacted = exc.to_outcome(), False
    except Exception as exc:  # an adapter bug after the request may have left: treat as unknown
        log.exception("adapter raised", extra={"message_id": envelope.message_id})
        outcome = Outcome(AttemptOutcome.UNKNOWN, Category.UNKNOWN_OUTCOME, detail=f"adapter error: {exc!r}")
        contacted = True
    if outcome.category is Category.CONFIG and hasattr(adapter, "forget_version_check"):
        # a config-looking failure: this worker checks the pinned version again before its next create
        adapter.forget_version_check()
    if getattr(adapter, "capability_fetches", 0) != fetches:
        # This attempt read the CapabilityStatement: compared with the last one seen (drift).
        outcome.capability = adapter.capability_summary
    return outcome, contacted


def note_capability(s: so.Session, conn: Connection, outcome: Outcome, message_id: str) -> None:
    """A CapabilityStatement different from the last one seen on this connection is drift."""
    if not outcome.capability or outcome.capability == conn.capability_summary:
        return
    if conn.capability_summary:
        change = capability_difference(conn.capability_summary, outcome.capability)
        drift.record(
            s,
            conn.id,
            message_id,
            [Observation("capability_change", "CapabilityStatement", change)],
            utcnow(),
        )
        audit.record(
            s,
            actor="system:worker",
            action="connection.capability_change",
            subject_type="connection",
            subject_id=conn.id,
            details={"change": change},
        )
    conn.capability_summary = outcome.capability


def note_circuit(s: so.Session, conn: Connection, outcome: Outcome) -> None:
    """Breaker bookkeeping for a real call (never for a call the open circuit itself held);
    every opening, re-opening after a failed probe, and closing is audited."""
    failures = conn.consecutive_failures + (0 if outcome.delivered else 1)
    transition = connections.note_outcome_for_circuit(conn, outcome)
    if transition is None:
        return
    details = {"failures": failures}
    if transition != "closed":
        details["until"] = conn.circuit_open_until.isoformat() + "Z"
    audit.record(
        s,
        actor="system:worker",
        action="circuit.close" if transition == "closed" else "circuit.open",
        subject_type="connection",
        subject_id=conn.id,
        reason={"opened": None, "reopened": "the half-open probe failed", "closed": "a call succeeded"}[
            transition
        ],
        details=details,
    )


def lock_connection(s: so.Session, connection_id: int) -> Connection:
    """The connection row, locked: the breaker's counters are read-modify-write (lock order:
    attempt/replay, connection, message, exception — docs/ARCHITECTURE.md)."""
    return s.get(Connection, connection_id, with_for_update=True, populate_existing=True)


class Heartbeat:
    """Renews a lease while the worker is alive and busy, so only a dead worker's lease expires.

    SIGKILL takes the thread with the process: the lease then runs out and the reaper acts.
    """

    def __init__(
        self,
        rt: Runtime,
        *,
        attempt_id: int | None = None,
        replay_id: int | None = None,
        attempt_ids: list[int] | None = None,
    ):
        self.rt, self.replay_id = rt, replay_id
        self.attempt_ids = list(attempt_ids or []) + ([attempt_id] if attempt_id is not None else [])
        self.attempt_id = self.attempt_ids[0] if self.attempt_ids else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.attempt_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = max(self.rt.lease_seconds / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                with transaction(self.rt.sessions) as s:
                    until = {"lease_expires_at": utcnow() + timedelta(seconds=self.rt.lease_seconds)}
                    # one statement for a whole batch: each row still only while it is in flight
                    s.execute(
                        sa.update(Attempt)
                        .where(Attempt.id.in_(self.attempt_ids), Attempt.outcome == AttemptState.IN_FLIGHT)
                        .values(**until)
                        .execution_options(synchronize_session=False)
                    )
                    if self.replay_id is not None:
                        cas_update(
                            s, Replay, self.replay_id, expect={"state": ReplayState.RUNNING}, values=until
                        )
            except Exception:  # a missed renewal only risks an early unknown_outcome, never a re-send
                log.warning("lease renewal failed", exc_info=True, extra={"attempt_id": self.attempt_id})


def late_result(s: so.Session, attempt_id: int, message_id: str, outcome: Outcome) -> str:
    """A result that arrived after the reaper declared the attempt lost: keep it as evidence and,
    when it proves delivery, settle the unknown_outcome item it left behind."""
    cas_update(
        s,
        Attempt,
        attempt_id,
        expect={"outcome": AttemptState.UNKNOWN},
        values=attempt_result_values(outcome, late=True),
    )
    audit.record(
        s,
        actor="system:worker",
        action="attempt.late_result",
        subject_type="message",
        subject_id=message_id,
        details={"attempt_id": attempt_id, "outcome": outcome.outcome.value},
    )
    if not outcome.delivered:
        return "late"
    item = s.scalar(
        sa.select(ExceptionItem).where(
            ExceptionItem.message_id == message_id,
            ExceptionItem.category == Category.UNKNOWN_OUTCOME.value,
            ExceptionItem.state.in_([ExceptionState.OPEN, ExceptionState.ESCALATED]),
        )
    )
    if item is not None and resolve(
        s,
        item,
        item.state,
        "late result: the EHR confirmed delivery",
        actor="system:worker",
        details={"attempt_id": attempt_id},
    ):
        set_message_status(s.get(Message, message_id), MessageState.DELIVERED)
    return "late"


def resolve(
    s: so.Session, item: ExceptionItem, from_state: str, reason: str, *, actor: str, details: dict
) -> bool:
    """System compare-and-set to resolved, audited only when it took effect."""
    now = utcnow()
    if not cas_update(
        s,
        ExceptionItem,
        item.id,
        expect={"state": from_state},
        values={"state": ExceptionState.RESOLVED, "resolved_at": now, "updated_at": now},
        bump_version=True,
    ):
        log.warning("exception %s left %s before it could be resolved", item.id, from_state)
        return False
    audit.record(
        s,
        actor=actor,
        action="exception.resolve",
        subject_type="exception",
        subject_id=item.id,
        from_state=from_state,
        to_state=ExceptionState.RESOLVED.value,
        reason=reason,
        details=details,
    )
    return True
