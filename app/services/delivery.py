"""Delivery, automatic retries, approved replays and the lease reaper (SPEC 2, 3.1).

A network call never happens inside a database transaction: each flow is
claim (one transaction, compare-and-set) → call the adapter → record (one
transaction, compare-and-set). A duplicate job finds nothing to claim and does
nothing; a worker that dies mid-call leaves an expired lease that the reaper
turns into `unknown_outcome` — never into a silent re-send.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.active import literal_states
from app.db.models import Attempt, Connection, ExceptionItem, Message, OutboxEntry, PayloadVersion, Replay
from app.db.session import transaction
from app.domain.capability import capability_difference
from app.domain.delivery import (
    TRANSIENT_NOT_APPLIED_STATUSES,
    UNCERTAIN_ATTEMPT_OUTCOMES,
    AttemptOutcome,
    Category,
    Envelope,
    Outcome,
    auto_retry_eligible,
    reconcile_not_before,
    retry_delay,
    routing_refusal,
)
from app.domain.liveness import HandoffPolicy
from app.domain.payloads import Observation
from app.domain.states import ExceptionState

from . import audit, connections, drift, faults
from .clock import utcnow
from .exceptions import open_exception, reopen

log = logging.getLogger("recon.delivery")

AdapterFactory = Callable[[Connection], object]


_adapters: dict = {}


def default_adapter_factory(conn: Connection):
    """One adapter per connection settings per worker process: the HTTP connection pool, the
    SMART token and the pinned-version check survive between jobs. Changed settings make a new one."""
    from app.adapters.ehr import adapter_for

    settings = connections.settings_for(conn)
    adapter = _adapters.get(settings)
    if adapter is None:
        for stale in [k for k in _adapters if k.name == settings.name]:
            _adapters.pop(stale).close()
        adapter = _adapters[settings] = adapter_for(settings)
    return adapter


@dataclass
class Runtime:
    """What a worker needs to run a flow: sessions, lease length, its name, adapters."""

    sessions: so.sessionmaker
    lease_seconds: float = 90.0
    worker_name: str = "worker"
    adapter_factory: AdapterFactory = default_adapter_factory
    housekeeping_seconds: float = 2.0
    handoff_margin_seconds: float = 10.0
    reconcile_grace_seconds: float = 15.0

    @classmethod
    def from_settings(cls, settings, worker_name: str) -> Runtime:
        """A worker process's runtime from its Settings (app/config.py)."""
        from app.db.session import session_factory

        return cls(
            sessions=session_factory(settings.database_url),
            lease_seconds=settings.lease_seconds,
            worker_name=worker_name,
            housekeeping_seconds=settings.housekeeping_seconds,
            handoff_margin_seconds=settings.handoff_margin_seconds,
            reconcile_grace_seconds=settings.reconcile_grace_seconds,
        )

    @property
    def policy(self) -> HandoffPolicy:
        return HandoffPolicy(
            lease_seconds=self.lease_seconds,
            housekeeping_seconds=self.housekeeping_seconds,
            margin_seconds=self.handoff_margin_seconds,
        )


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


def _gate(rt: Runtime, conn: Connection, message_type: str) -> Outcome | None:
    """Reasons not to call the EHR at all: connection disabled, type not enabled (config), or the
    circuit open — or half-open with another worker's probe in flight (held: not a try)."""
    refusal = routing_refusal(connections.settings_for(conn), message_type)
    if refusal:
        return Outcome(AttemptOutcome.REJECTED, Category.CONFIG, detail=refusal, provably_not_applied=True)
    state = connections.circuit_state(conn)
    if state == "open":
        return Outcome(
            AttemptOutcome.TRANSIENT,
            Category.EHR_UNAVAILABLE,
            provably_not_applied=True,
            held=True,
            detail=f"held: circuit open for {conn.name} until {conn.circuit_open_until:%H:%M:%S} UTC "
            "(not sent; no retry spent)",
        )
    if state == "half_open" and not _claim_probe(rt, conn):
        return Outcome(
            AttemptOutcome.TRANSIENT,
            Category.EHR_UNAVAILABLE,
            provably_not_applied=True,
            held=True,
            detail=f"held: circuit half-open for {conn.name}, another call is probing the EHR "
            "(not sent; no retry spent)",
        )
    return None


def _claim_probe(rt: Runtime, conn: Connection) -> bool:
    """Half-open lets exactly one call through across all workers: compare-and-set on the
    connection row (the claim lapses after the call's own timeouts if its worker dies)."""
    now = utcnow()
    window = timedelta(seconds=conn.connect_timeout + conn.read_timeout + 5)
    with transaction(rt.sessions) as s:
        won = s.execute(
            sa.update(Connection)
            .where(
                Connection.id == conn.id,
                sa.or_(
                    Connection.circuit_open_until.is_(None),  # closed meanwhile: go ahead
                    sa.and_(
                        Connection.circuit_open_until <= now,
                        sa.or_(
                            Connection.circuit_probe_until.is_(None), Connection.circuit_probe_until < now
                        ),
                    ),
                ),
            )
            .values(circuit_probe_until=now + window)
            .execution_options(synchronize_session=False)
        ).rowcount
    return won == 1


def attempt_result_values(outcome: Outcome, *, late: bool = False) -> dict:
    """The columns an attempt's result fills."""
    detail = outcome.detail[:1900]
    if late:
        detail = f"late result, after the lease expired: {detail}"
    return {
        "outcome": outcome.outcome.value,
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


def _finish_attempt(s: so.Session, attempt_id: int, outcome: Outcome) -> bool:
    """Compare-and-set in_flight → result. False: the reaper declared it lost first."""
    done = s.execute(
        sa.update(Attempt)
        .where(Attempt.id == attempt_id, Attempt.outcome == "in_flight")
        .values(**attempt_result_values(outcome))
        .execution_options(synchronize_session=False)
    ).rowcount
    return done == 1


def _call(
    rt: Runtime, conn: Connection, envelope: Envelope, message_type: str, *, gate_passed: bool = False
) -> tuple[Outcome, bool]:
    """Deliver through the connection's adapter. Returns (outcome, whether the EHR was contacted).
    gate_passed: the caller already passed `_gate` for this call (and may hold the probe)."""
    from app.adapters.ehr.errors import AdapterError

    gated = None if gate_passed else _gate(rt, conn, message_type)
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
    if getattr(adapter, "capability_fetches", 0) != fetches:
        # This attempt read the CapabilityStatement: compared with the last one seen (drift).
        outcome.capability = adapter.capability_summary
    return outcome, contacted


def _note_capability(s: so.Session, conn: Connection, outcome: Outcome, message_id: str) -> None:
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


def _note_circuit(s: so.Session, conn: Connection, outcome: Outcome) -> None:
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


class _Heartbeat:
    """Renews a lease while the worker is alive and busy, so only a dead worker's lease expires.

    SIGKILL takes the thread with the process: the lease then runs out and the reaper acts.
    """

    def __init__(self, rt: Runtime, *, attempt_id: int, replay_id: int | None = None):
        self.rt, self.attempt_id, self.replay_id = rt, attempt_id, replay_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{attempt_id}", daemon=True)

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
                    until = utcnow() + timedelta(seconds=self.rt.lease_seconds)
                    s.execute(
                        sa.update(Attempt)
                        .where(Attempt.id == self.attempt_id, Attempt.outcome == "in_flight")
                        .values(lease_expires_at=until)
                    )
                    if self.replay_id is not None:
                        s.execute(
                            sa.update(Replay)
                            .where(Replay.id == self.replay_id, Replay.state == "running")
                            .values(lease_expires_at=until)
                        )
            except Exception:  # a missed renewal only risks an early unknown_outcome, never a re-send
                log.warning("lease renewal failed", exc_info=True, extra={"attempt_id": self.attempt_id})


def _late_result(s: so.Session, attempt_id: int, message_id: str, outcome: Outcome) -> str:
    """A result that arrived after the reaper declared the attempt lost: keep it as evidence and,
    when it proves delivery, settle the unknown_outcome item it left behind."""
    s.execute(
        sa.update(Attempt).where(Attempt.id == attempt_id).values(**attempt_result_values(outcome, late=True))
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
            ExceptionItem.state.in_([ExceptionState.OPEN.value, ExceptionState.ESCALATED.value]),
        )
    )
    if item is not None and _resolve(
        s,
        item,
        item.state,
        "late result: the EHR confirmed delivery",
        actor="system:worker",
        details={"attempt_id": attempt_id},
    ):
        message = s.get(Message, message_id)
        message.status = "delivered"
        message.updated_at = utcnow()
    return "late"


def _resolve(
    s: so.Session, item: ExceptionItem, from_state: str, reason: str, *, actor: str, details: dict
) -> bool:
    """System compare-and-set to resolved, audited only when it took effect."""
    now = utcnow()
    done = s.execute(
        sa.update(ExceptionItem)
        .where(ExceptionItem.id == item.id, ExceptionItem.state == from_state)
        .values(state="resolved", resolved_at=now, version=ExceptionItem.version + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if done != 1:
        log.warning("exception %s left %s before it could be resolved", item.id, from_state)
        return False
    audit.record(
        s,
        actor=actor,
        action="exception.resolve",
        subject_type="exception",
        subject_id=item.id,
        from_state=from_state,
        to_state="resolved",
        reason=reason,
        details=details,
    )
    return True


# --- first delivery and automatic retries -------------------------------------------------------


def deliver_attempt(rt: Runtime, attempt_id: int) -> str:
    """Run one queued attempt (intake or automatic retry). Returns what happened."""
    with transaction(rt.sessions) as s:
        now = utcnow()
        claimed = s.execute(
            sa.update(Attempt)
            .where(Attempt.id == attempt_id, Attempt.outcome == "queued")
            .values(
                outcome="in_flight",
                started_at=now,
                lease_expires_at=now + timedelta(seconds=rt.lease_seconds),
            )
        ).rowcount
        if claimed != 1:
            return "skipped: attempt already claimed"
        attempt = s.get(Attempt, attempt_id)
        message = s.get(Message, attempt.message_id)
        message.status = "delivering"
        conn = message.connection
        envelope = envelope_for(message, s.get(PayloadVersion, attempt.payload_version_id))
        message_type, message_id = message.message_type, message.id

    faults.checkpoint("claimed")
    with _Heartbeat(rt, attempt_id=attempt_id):
        outcome, contacted = _call(rt, conn, envelope, message_type)
    faults.checkpoint("called")

    with transaction(rt.sessions) as s:
        if not _finish_attempt(s, attempt_id, outcome):
            return _late_result(s, attempt_id, message_id, outcome)
        attempt = s.get(Attempt, attempt_id)
        message = s.get(Message, message_id)
        # Row-locked: the breaker's counters are read-modify-write (lock order: attempt/replay,
        # connection, message, exception — docs/ARCHITECTURE.md).
        conn = s.get(Connection, message.connection_id, with_for_update=True, populate_existing=True)
        if contacted:
            _note_circuit(s, conn, outcome)
        _note_capability(s, conn, outcome, message_id)
        item = s.scalar(
            sa.select(ExceptionItem).where(
                ExceptionItem.message_id == message.id, ExceptionItem.state == ExceptionState.RETRYING.value
            )
        )
        return _settle_delivery(s, message, conn, attempt, outcome, item)


def _settle_delivery(
    s: so.Session,
    message: Message,
    conn: Connection,
    attempt: Attempt,
    outcome: Outcome,
    item: ExceptionItem | None,
) -> str:
    now = utcnow()
    message.updated_at = now
    if outcome.delivered:
        message.status = "delivered"
        audit.record(
            s,
            actor="system:worker",
            action="message.deliver",
            subject_type="message",
            subject_id=message.id,
            details={"attempt_id": attempt.id, "resource": outcome.resource_ref, "trigger": attempt.trigger},
        )
        if item is not None:
            _resolve(
                s,
                item,
                "retrying",
                "automatic retry delivered",
                actor="system:retry",
                details={"attempt_id": attempt.id},
            )
        return "delivered"

    message.status = "exception"
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
            if conn.circuit_open_until and conn.circuit_open_until > now:
                next_at = conn.circuit_open_until
            else:  # half-open and another call is probing: look again shortly
                next_at = now + timedelta(seconds=min(2.0, conn.connect_timeout + conn.read_timeout))
        else:
            delay = retry_delay(
                conn.retry_backoff_seconds,
                retries_done,
                retry_after=outcome.retry_after_seconds,
                draw=random.random(),
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
        elif (
            s.execute(
                sa.update(ExceptionItem)
                .where(ExceptionItem.id == item.id, ExceptionItem.state == "retrying")
                .values(
                    next_retry_at=next_at,
                    category=outcome.category.value,
                    detail=detail[:4000],
                    version=ExceptionItem.version + 1,
                    updated_at=now,
                    **refund,
                )
            ).rowcount
            == 1
        ):
            audit.record(
                s,
                actor="system:retry",
                action="exception.retry_scheduled",
                subject_type="exception",
                subject_id=item.id,
                from_state="retrying",
                to_state="retrying",
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
            from_state="retrying",
            actor="system:retry",
            may_have_applied=may_have_applied,
        )
    return "exception"


def schedule_due_retries(rt: Runtime, limit: int = 100) -> int:
    """Queue an attempt for every retrying exception whose time has come."""
    queued = 0
    with transaction(rt.sessions) as s:
        now = utcnow()
        # One range of ix_exceptions_retry_due (next_retry_at, id) WHERE state = 'retrying': the
        # state written into the SQL so the planner can match the index predicate.
        due = s.scalars(
            sa.select(ExceptionItem)
            .where(literal_states(ExceptionItem.state, ["retrying"]), ExceptionItem.next_retry_at <= now)
            .order_by(ExceptionItem.next_retry_at, ExceptionItem.id)
            .limit(limit)
        ).all()
        for item in due:
            taken = s.execute(
                sa.update(ExceptionItem)
                .where(
                    ExceptionItem.id == item.id,
                    ExceptionItem.state == "retrying",
                    ExceptionItem.next_retry_at == item.next_retry_at,
                )
                .values(
                    next_retry_at=None,
                    retry_count=ExceptionItem.retry_count + 1,
                    version=ExceptionItem.version + 1,
                    updated_at=now,
                )
            ).rowcount
            if taken != 1:
                continue
            s.refresh(item)
            message = item.message
            attempt = Attempt(
                message_id=message.id,
                payload_version_id=message.current_payload_id,
                trigger=f"auto_retry:{item.retry_count}",
                started_at=now,
                outcome="queued",
            )
            s.add(attempt)
            s.flush()
            s.add(
                OutboxEntry(
                    kind="deliver", ref_id=str(attempt.id), job_id=f"deliver-{attempt.id}", created_at=now
                )
            )
            queued += 1
    return queued


# --- approved replays ----------------------------------------------------------------------------


def _reconcile_window_end(s: so.Session, message_id: str, read_timeout: float, grace: float):
    """When the latest earlier attempt that may still be in the EHR's hands stops being so."""
    last_uncertain = s.scalar(
        sa.select(sa.func.max(Attempt.started_at)).where(
            Attempt.message_id == message_id,
            sa.or_(
                Attempt.outcome.in_(UNCERTAIN_ATTEMPT_OUTCOMES),
                sa.and_(
                    Attempt.outcome == AttemptOutcome.TRANSIENT.value,
                    sa.func.coalesce(Attempt.category, "") != Category.TRANSPORT.value,
                    sa.func.coalesce(Attempt.status_code, 0).notin_(TRANSIENT_NOT_APPLIED_STATUSES),
                ),
            ),
        )
    )
    return reconcile_not_before(last_uncertain, read_timeout, grace)


def _defer_if_too_early(rt: Runtime, replay_id: int) -> str | None:
    """An earlier request of this message may still be in the EHR's hands (unknown outcome, a worker
    killed mid-call, a 5xx): a search now could miss a commit about to land, and a re-send would
    apply the order twice. Until that request's window closes, the replay is not claimed: it goes
    back to the outbox, released to the queue at the window's end — no worker waits meanwhile."""
    with transaction(rt.sessions) as s:
        replay = s.get(Replay, replay_id)
        if replay is None or replay.state != "queued":
            return None  # the claim below reports it
        message = s.get(Message, replay.message_id)
        not_before = _reconcile_window_end(
            s, message.id, message.connection.read_timeout, rt.reconcile_grace_seconds
        )
        now = utcnow()
        # Nothing can reach the EHR while its circuit is open or another call probes it: the
        # replay waits (not failed, not sent) and runs when the circuit lets it.
        conn = message.connection
        if conn.circuit_open_until is not None:
            hold = conn.circuit_open_until
            if hold <= now and conn.circuit_probe_until is not None and conn.circuit_probe_until > now:
                hold = now + timedelta(seconds=2)
            if hold > now and (not_before is None or hold > not_before):
                not_before = hold
        if not_before is None or not_before <= now:
            return None
        deferred = s.execute(
            sa.update(Replay)
            .where(Replay.id == replay_id, Replay.state == "queued")
            .values(not_before=not_before)
            .execution_options(synchronize_session=False)
        ).rowcount
        if deferred != 1:
            return None
        s.add(
            OutboxEntry(
                kind="replay",
                ref_id=str(replay_id),
                job_id=f"replay-{replay_id}-after-{not_before:%Y%m%d%H%M%S%f}",
                created_at=now,
                available_at=not_before,
            )
        )
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
        now = utcnow()
        claimed = s.execute(
            sa.update(Replay)
            .where(Replay.id == replay_id, Replay.state == "queued")
            .values(
                state="running",
                started_at=now,
                worker=rt.worker_name,
                lease_expires_at=now + timedelta(seconds=rt.lease_seconds),
            )
        ).rowcount
        if claimed != 1:
            return "skipped: replay already claimed"
        replay = s.get(Replay, replay_id)
        message = s.get(Message, replay.message_id)
        conn = message.connection
        attempt = Attempt(
            message_id=message.id,
            replay_id=replay.id,
            payload_version_id=replay.payload_version_id,
            trigger=f"replay:{replay.id}",
            started_at=now,
            outcome="in_flight",
            lease_expires_at=replay.lease_expires_at,
        )
        s.add(attempt)
        s.flush()
        attempt_id, message_id, corrected = attempt.id, message.id, replay.corrected
        envelope = envelope_for(message, replay.payload_version)
        message_type = message.message_type

    faults.checkpoint("claimed")
    found: bool | None = None
    contacted = False
    with _Heartbeat(rt, attempt_id=attempt_id, replay_id=replay_id):
        # One gate for the search and the send: in half-open, this replay's search is the probe.
        outcome = _gate(rt, conn, message_type)
        if outcome is None and conn.supports_identifier_search:
            try:
                found = rt.adapter_factory(conn).find_applied(envelope)
            except Exception:  # cannot tell
                log.exception("find_applied raised", extra={"replay_id": replay_id})
                found = None
            if found is None:
                outcome = Outcome(
                    AttemptOutcome.UNKNOWN,
                    Category.UNKNOWN_OUTCOME,
                    summary="search by identifier",
                    detail="identifier search failed: cannot tell whether the EHR applied it; not re-sent",
                )
            elif found and corrected:
                # The EHR holds the ORIGINAL payload: sending the correction would duplicate the order,
                # and resolving would record a correction the EHR never got. A human decides.
                outcome = Outcome(
                    AttemptOutcome.REJECTED,
                    Category.DUPLICATE_SUSPECTED,
                    summary="search by identifier",
                    provably_not_applied=True,
                    detail="the EHR already holds this order as first sent; the correction was not "
                    "sent (amend it in the EHR, or discard as applied_manually)",
                )
            elif found:
                outcome = Outcome(
                    AttemptOutcome.DELIVERED,
                    summary="search by identifier",
                    detail="found already applied by identifier search; not re-sent",
                )
        if outcome is None:
            outcome, contacted = _call(rt, conn, envelope, message_type, gate_passed=True)
    faults.checkpoint("called")

    with transaction(rt.sessions) as s:
        now = utcnow()
        settled = s.execute(
            sa.update(Replay)
            .where(Replay.id == replay_id, Replay.state == "running")
            .values(
                state="succeeded" if outcome.delivered else "failed",
                finished_at=now,
                lease_expires_at=None,
                result=(outcome.detail or f"delivered {outcome.resource_ref or ''}".strip())[:2000]
                if outcome.delivered
                else (outcome.detail or str(outcome.category))[:2000],
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if settled != 1:  # the reaper already declared it lost
            return _late_result(s, attempt_id, message_id, outcome)
        _finish_attempt(s, attempt_id, outcome)
        replay = s.get(Replay, replay_id)
        item = s.get(ExceptionItem, replay.exception_id)
        message = s.get(Message, message_id)
        # Row-locked: the breaker's counters are read-modify-write (lock order: attempt/replay,
        # connection, message, exception — docs/ARCHITECTURE.md).
        conn = s.get(Connection, message.connection_id, with_for_update=True, populate_existing=True)
        if contacted:
            _note_circuit(s, conn, outcome)
        _note_capability(s, conn, outcome, message_id)
        if outcome.delivered:
            message.status = "delivered"
            message.current_payload_id = replay.payload_version_id
            message.updated_at = now
            _resolve(
                s,
                item,
                "replaying",
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
            from_state="replaying",
            actor="system:worker",
            may_have_applied=not outcome.provably_not_applied,
        )
        return "reopened"


# --- the reaper and the outbox relay -------------------------------------------------------------


def _expire_attempts(s: so.Session, now, *where) -> list[Attempt]:
    """Compare-and-set in_flight → unknown for the matching attempts; returns those it took."""
    taken = []
    for attempt in s.scalars(sa.select(Attempt).where(Attempt.outcome == "in_flight", *where)).all():
        if (
            s.execute(
                sa.update(Attempt)
                .where(Attempt.id == attempt.id, Attempt.outcome == "in_flight")
                .values(
                    outcome=AttemptOutcome.UNKNOWN.value,
                    category=Category.UNKNOWN_OUTCOME.value,
                    finished_at=now,
                    lease_expires_at=None,
                    detail="worker lost mid-delivery",
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            == 1
        ):
            taken.append(attempt)
    return taken


def reap_expired_leases(rt: Runtime) -> int:
    """Replays and attempts whose worker died become `unknown_outcome` for a human — never re-sent."""
    reaped = 0
    with transaction(rt.sessions) as s:
        now = utcnow()
        for replay in s.scalars(
            sa.select(Replay).where(Replay.state == "running", Replay.lease_expires_at < now)
        ).all():
            if (
                s.execute(
                    sa.update(Replay)
                    .where(Replay.id == replay.id, Replay.state == "running")
                    .values(
                        state="lost",
                        finished_at=now,
                        lease_expires_at=None,
                        result="worker lost mid-delivery: outcome unknown",
                    )
                ).rowcount
                != 1
            ):
                continue
            _expire_attempts(s, now, Attempt.replay_id == replay.id)
            item = s.get(ExceptionItem, replay.exception_id)
            audit.record(
                s,
                actor="system:reaper",
                action="replay.lease_expired",
                subject_type="replay",
                subject_id=replay.id,
                from_state="running",
                to_state="lost",
                details={"worker": replay.worker},
            )
            reopen(
                s,
                item,
                Category.UNKNOWN_OUTCOME,
                f"replay {replay.id} lost its worker ({replay.worker}) mid-delivery: the EHR may or may not "
                "have applied it",
                from_state="replaying",
                actor="system:reaper",
            )
            reaped += 1
        for attempt in _expire_attempts(s, now, Attempt.replay_id.is_(None), Attempt.lease_expires_at < now):
            message = s.get(Message, attempt.message_id)
            message.status = "exception"
            message.updated_at = now
            detail = (
                f"attempt {attempt.id} lost its worker mid-delivery: the EHR may or may not have applied it"
            )
            item = s.scalar(
                sa.select(ExceptionItem).where(
                    ExceptionItem.message_id == message.id, ExceptionItem.state == "retrying"
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
                    s, item, Category.UNKNOWN_OUTCOME, detail, from_state="retrying", actor="system:reaper"
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
    from .exceptions import escalate_breached as escalate

    with transaction(rt.sessions) as s:
        return escalate(s)


def pending_outbox(rt: Runtime, limit: int = 200) -> list[OutboxEntry]:
    """Unrelayed outbox rows whose time has come (a deferred replay's row waits for its window)."""
    with transaction(rt.sessions) as s:
        return list(
            s.scalars(
                sa.select(OutboxEntry)
                .where(
                    OutboxEntry.relayed_at.is_(None),
                    sa.or_(OutboxEntry.available_at.is_(None), OutboxEntry.available_at <= utcnow()),
                )
                .order_by(OutboxEntry.id)
                .limit(limit)
            )
        )


def next_deferred_at(rt: Runtime):
    """When the earliest deferred outbox row becomes available (None: nothing deferred)."""
    with transaction(rt.sessions, read_only=True) as s:
        return s.scalar(
            sa.select(sa.func.min(OutboxEntry.available_at)).where(
                OutboxEntry.relayed_at.is_(None), OutboxEntry.available_at.is_not(None)
            )
        )


def mark_relayed(rt: Runtime, entry_ids: list[int]) -> None:
    if not entry_ids:
        return
    with transaction(rt.sessions) as s:
        s.execute(
            sa.update(OutboxEntry)
            .where(OutboxEntry.id.in_(entry_ids), OutboxEntry.relayed_at.is_(None))
            .values(relayed_at=utcnow())
        )
