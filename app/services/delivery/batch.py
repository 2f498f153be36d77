"""Several deliveries of one connection per job (issue 6, "Throughput"): claim → call → settle as in
deliver.py, but for up to `Runtime.delivery_batch` queued attempts at once, with up to
`Runtime.delivery_concurrency` calls to the EHR in flight together.

* Claim: one transaction — the job's own attempt by compare-and-set, then one UPDATE … RETURNING
  that moves up to batch − 1 more queued attempts of the same connection to in_flight (each row
  still a compare-and-set on outcome = queued; PostgreSQL skips rows another claimer has locked),
  their messages to delivering, and reads their payloads.
* Call: the gate once (a closed circuit, not paused) and the calls on a thread pool; a batch whose
  own failures reach the breaker's threshold stops sending (the rest are held: not sent, no retry
  spent). A circuit not closed, or a paused connection, runs the calls one by one through the
  per-call gate (one half-open probe across all workers, as before).
* Settle: one transaction — each attempt's result a compare-and-set on in_flight (a result the
  reaper beat is kept as a late result), then each message, exception and audit event as
  `settle_delivery` writes them. The connection row is locked only when the breaker or the
  capability bookkeeping has something to write; the audit chain is sealed once, after the commit.

Sequence-sensitive connections keep the one-attempt flow (deliver.py): ordering holds are decided
per attempt. Every attempt keeps its own row, its own lease and its own audit events; a worker
killed mid-batch leaves every claimed lease to expire, and the reaper makes each unknown_outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import sqlalchemy as sa

from app.db.active import literal_states
from app.db.models import Attempt, Connection, ExceptionItem, Message, PayloadVersion
from app.db.session import transaction
from app.domain.delivery import Category, Envelope, Outcome, Protocol, counts_against_breaker
from app.domain.states import AttemptState, ExceptionState, MessageState

from .. import connections, faults
from ..clock import utcnow
from .common import (
    Heartbeat,
    attempt_result_values,
    call,
    config_refusal,
    envelope_for,
    held,
    late_result,
    lock_connection,
    note_capability,
    note_circuit,
    set_message_status,
)
from .deliver import deliver_attempt, settle_delivery
from .runtime import Runtime
from .versions import recheck_soon


@dataclass
class Claimed:
    """One attempt of a batch: what settle_delivery reads of an Attempt, and what the call needs."""

    id: int
    message_id: str
    payload_version_id: int | None
    trigger: str
    message_type: str = ""
    envelope: Envelope | None = None
    outcome: Outcome | None = None
    contacted: bool = False


@dataclass
class BatchResult:
    own: str
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        if sum(self.counts.values()) <= 1:
            return self.own
        shown = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
        return f"{self.own} (batch: {shown})"


def deliver_batch(rt: Runtime, attempt_id: int, on_claimed: Callable[[list[int]], None] | None = None) -> str:
    """Run queued attempt `attempt_id` and, where its connection allows, other queued attempts of the
    same connection with it. on_claimed(ids): called with the other attempts' ids right after the
    claim commits (the job drops their now-pointless RQ jobs). Returns what happened to its own."""
    if rt.delivery_batch <= 1:
        return deliver_attempt(rt, attempt_id)
    with transaction(rt.sessions) as s:
        conn = s.scalar(
            sa.select(Connection)
            .join(Message, Message.connection_id == Connection.id)
            .join(Attempt, Attempt.message_id == Message.id)
            .where(Attempt.id == attempt_id)
        )
        if conn is None or conn.sequence_sensitive:
            conn = None
        else:
            batch = claim_batch(s, rt, conn, attempt_id)
    if conn is None or not batch:
        # Ordering, or nothing to claim: the one-attempt flow decides (and says why it skipped).
        return deliver_attempt(rt, attempt_id)
    others = [c.id for c in batch if c.id != attempt_id]
    if on_claimed is not None and others:
        on_claimed(others)
    faults.checkpoint("claimed")
    with Heartbeat(rt, attempt_ids=[c.id for c in batch]):
        run_calls(rt, conn, batch)
    faults.checkpoint("called")
    results = settle_batch(rt, conn.id, batch)
    counts: dict[str, int] = {}
    for what in results.values():
        counts[what] = counts.get(what, 0) + 1
    return str(BatchResult(results.get(attempt_id, "skipped: attempt already claimed"), counts))


def claim_batch(s, rt: Runtime, conn: Connection, attempt_id: int) -> list[Claimed]:
    """The job's own attempt (compare-and-set queued → in_flight), then up to batch − 1 more queued,
    unheld attempts of the connection in one UPDATE … RETURNING (also when its own was taken
    already); their messages → delivering. Empty: nothing to claim."""
    now = utcnow()
    values = {
        "outcome": AttemptState.IN_FLIGHT,
        "started_at": now,
        "lease_expires_at": now + timedelta(seconds=rt.lease_seconds),
    }
    returning = (Attempt.id, Attempt.message_id, Attempt.payload_version_id, Attempt.trigger)
    rows = s.execute(
        sa.update(Attempt)
        .where(
            Attempt.id == attempt_id, Attempt.outcome == AttemptState.QUEUED, Attempt.held_behind.is_(None)
        )
        .values(**values)
        .returning(*returning)
        .execution_options(synchronize_session=False)
    ).all()
    # Its own attempt taken already (by another job's batch): the job still drains what waits on
    # the connection — with several workers, most jobs would otherwise find nothing to do.
    if rt.delivery_batch > len(rows):
        others = (
            queued_of_connection(conn.id, rt.delivery_batch - len(rows))
            # A CTE: PostgreSQL runs it once. As `IN (subquery … LIMIT)` the planner may run the
            # subquery again (seen: one job claimed all 400 queued attempts).
            .cte("batch_claim")
        )
        rows = [
            *rows,
            *s.execute(
                sa.update(Attempt)
                # the compare-and-set: a row another claimer took meanwhile is no longer queued
                .where(Attempt.id.in_(sa.select(others.c.id)), Attempt.outcome == AttemptState.QUEUED)
                .where(Attempt.held_behind.is_(None))
                .values(**values)
                .returning(*returning)
                .execution_options(synchronize_session=False)
            ).all(),
        ]
    batch = [Claimed(r.id, r.message_id, r.payload_version_id, r.trigger) for r in rows]
    if not batch:
        return []
    messages = {
        m.id: m for m in s.scalars(sa.select(Message).where(Message.id.in_([c.message_id for c in batch])))
    }
    payloads = {
        p.id: p
        for p in s.scalars(
            sa.select(PayloadVersion).where(PayloadVersion.id.in_({c.payload_version_id for c in batch}))
        )
    }
    for c in batch:
        message = messages[c.message_id]
        set_message_status(message, MessageState.DELIVERING)
        c.message_type = message.message_type
        c.envelope = envelope_for(message, payloads.get(c.payload_version_id) or PayloadVersion(text=""))
    return batch


def queued_of_connection(connection_id: int, limit: int) -> sa.Select:
    """The first `limit` queued, unheld attempts of a connection in id order, locked; rows another
    claimer holds are skipped (PostgreSQL; SQLite has one writer and ignores the clause).

    Each queued attempt's connection is read through its message's primary key (a correlated
    subquery, which the planner cannot turn into a join): the cost is linear in the queued attempts
    (ix_attempts_queued; a few µs each, 2–4 ms at 1,000 queued) whatever the statistics say. As a
    join on messages.connection_id, a planner without fresh statistics (a backlog that just arrived)
    chose a nested loop reading every message of the connection for every queued attempt — queued ×
    messages: ~75–110 ms of PostgreSQL CPU per claim at 1,000 queued, which with four workers
    claiming at once was the pipeline's bottleneck (tests/integration/test_delivery_claim_plan.py)."""
    connection_of = sa.select(Message.connection_id).where(Message.id == Attempt.message_id).scalar_subquery()
    return (
        sa.select(Attempt.id)
        .where(
            literal_states(Attempt.outcome, [AttemptState.QUEUED.value]),
            Attempt.held_behind.is_(None),
            connection_of == connection_id,
        )
        .order_by(Attempt.id)
        .limit(limit)
        .with_for_update(of=Attempt, skip_locked=True)
    )


def run_calls(rt: Runtime, conn: Connection, batch: list[Claimed]) -> None:
    """Each claimed attempt's call, up to `delivery_concurrency` at a time while the circuit is
    closed and the calls succeed (_Breaker: how many may be in flight)."""
    state = connections.circuit_state(conn)
    if connections.is_paused(conn) or state == "open":
        for c in batch:  # the per-call gate: held, not sent
            c.outcome, c.contacted = call(rt, conn, c.envelope, c.message_type)
        return
    if state == "half_open":
        # One probe across all workers (the gate's claim); only when it succeeds does the rest go.
        probe, batch = batch[0], batch[1:]
        probe.outcome, probe.contacted = call(rt, conn, probe.envelope, probe.message_type)
        if not probe.contacted or counts_against_breaker(probe.outcome):
            for c in batch:  # held (another call is probing, or the circuit opens again)
                c.outcome, c.contacted = call(rt, conn, c.envelope, c.message_type)
            return
    refusals = {t: config_refusal(conn, t) for t in {c.message_type for c in batch}}
    # HL7 v2 over MLLP: one persistent connection, answered in order — one call at a time.
    limit = 1 if conn.protocol == Protocol.HL7V2_MLLP else rt.delivery_concurrency
    # after a successful probe the breaker is closing: count failures afresh
    failures = 0 if state == "half_open" else conn.consecutive_failures
    key = (conn.id, conn.endpoint)
    # A connection whose last batch here went well starts as wide as it ended (no ramp per batch).
    breaker = _Breaker(conn, limit, failures=failures, successes=_healthy.get(key, 0) if not failures else 0)
    workers = max(1, min(limit, len(batch)))
    pool = _pool(workers) if workers > 1 else None

    def one(c: Claimed) -> None:
        try:
            c.outcome, c.contacted = call(rt, conn, c.envelope, c.message_type, gate_passed=True)
        finally:
            breaker.release(c.outcome)

    futures = []
    for c in batch:
        if refusals[c.message_type] is not None:
            c.outcome, c.contacted = refusals[c.message_type], False
        elif not breaker.acquire():
            c.outcome, c.contacted = (
                held(
                    f"held: {conn.name} failed {breaker.failures} calls in a row "
                    "(the circuit opens); not sent, no retry spent"
                ),
                False,
            )
        elif pool is None:
            one(c)
        else:
            futures.append(pool.submit(one, c))
    for future in futures:
        future.result()
    _healthy[key] = breaker.successes if breaker.failures == 0 else 0


# (connection id, endpoint) → the width its last batch in this process reached, while healthy
_healthy: dict[tuple[int, str], int] = {}


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size per process: starting threads for every batch cost more than the calls."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver")
        return pool


class _Breaker:
    """The batch's own view of the breaker while its calls run (the stored counters are written at
    settle). Calls in flight at once: threshold − 1 − failures (at least one), plus one more for
    each success, at most `limit` — a connection starts carefully and widens while the EHR
    answers (a healthy connection's next batch in this process starts as wide as the last one
    ended), so a failing EHR sees about as many calls as one call at a time would have sent (with
    threshold 2: one at a time) and never more than `limit` past the threshold. Once the
    consecutive failures reach the threshold, nothing more is sent (the rest are held)."""

    def __init__(self, conn: Connection, limit: int, failures: int, successes: int = 0):
        self.failures = failures
        self.threshold = conn.circuit_failure_threshold
        self.limit = max(limit, 1)
        self.successes = min(successes, self.limit)
        self.in_flight = 0
        self._cond = threading.Condition()

    @property
    def tripped(self) -> bool:
        return self.failures >= self.threshold

    def _allowed(self) -> int:
        return min(self.limit, max(1, self.threshold - 1 - self.failures) + self.successes)

    def acquire(self) -> bool:
        """Wait for a slot; False once the failures reached the threshold."""
        with self._cond:
            while not self.tripped and self.in_flight >= self._allowed():
                self._cond.wait()
            if self.tripped:
                return False
            self.in_flight += 1
            return True

    def release(self, outcome: Outcome | None) -> None:
        with self._cond:
            self.in_flight -= 1
            if outcome is None or counts_against_breaker(outcome):
                self.failures += 1
            else:
                self.failures = 0
                self.successes += 1
            self._cond.notify_all()


def _breaker_at_rest(conn: Connection) -> bool:
    return (
        conn.consecutive_failures == 0
        and conn.circuit_open_until is None
        and conn.circuit_probe_until is None
    )


def finish_attempts(s, batch: list[Claimed]) -> list[Claimed]:
    """Compare-and-set in_flight → result for a batch in two statements: the attempts still in
    flight, locked (the reaper's own compare-and-set waits, then finds them settled), then their
    results in one executemany. Returns those that took; the rest the reaper declared lost first."""
    ids = [c.id for c in batch]
    in_flight = set(
        s.scalars(
            sa.select(Attempt.id)
            .where(Attempt.id.in_(ids), Attempt.outcome == AttemptState.IN_FLIGHT)
            .with_for_update()
        )
    )
    took = [c for c in batch if c.id in in_flight]
    if took:
        table = Attempt.__table__
        columns = list(attempt_result_values(took[0].outcome))
        s.connection().execute(
            table.update()
            .where(table.c.id == sa.bindparam("attempt_id"), table.c.outcome == AttemptState.IN_FLIGHT.value)
            .values({name: sa.bindparam(f"new_{name}") for name in columns}),
            [
                {"attempt_id": c.id, **{f"new_{k}": v for k, v in attempt_result_values(c.outcome).items()}}
                for c in took
            ],
        )
    return took


def settle_batch(rt: Runtime, connection_id: int, batch: list[Claimed]) -> dict[int, str]:
    """Every called attempt's result in one transaction; returns what happened to each."""
    results: dict[int, str] = {}
    with transaction(rt.sessions) as s:
        settled = finish_attempts(s, batch)
        for c in batch:
            if c not in settled:
                results[c.id] = late_result(s, c.id, c.message_id, c.outcome)
        if not settled:
            return results
        contacted = [c.outcome for c in settled if c.contacted]
        quiet = all(not counts_against_breaker(o) and not o.capability for o in contacted) and not any(
            c.outcome.category is Category.CONFIG for c in settled
        )
        conn = s.get(Connection, connection_id, populate_existing=True)
        if not (quiet and _breaker_at_rest(conn)):
            # Something to write on the connection row (breaker counters, capability): lock it.
            conn = lock_connection(s, connection_id)
            for c in settled:
                if c.contacted:
                    note_circuit(s, conn, c.outcome)
                note_capability(s, conn, c.outcome, c.message_id)
                if c.outcome.category is Category.CONFIG:
                    recheck_soon(conn)
        message_ids = [c.message_id for c in settled]
        messages = {m.id: m for m in s.scalars(sa.select(Message).where(Message.id.in_(message_ids)))}
        items = {
            i.message_id: i
            for i in s.scalars(
                sa.select(ExceptionItem).where(
                    ExceptionItem.message_id.in_(message_ids), ExceptionItem.state == ExceptionState.RETRYING
                )
            )
        }
        for c in settled:
            results[c.id] = settle_delivery(
                rt, s, messages[c.message_id], conn, c, c.outcome, items.get(c.message_id)
            )
    return results


__all__ = [
    "BatchResult",
    "Claimed",
    "claim_batch",
    "deliver_batch",
    "queued_of_connection",
    "run_calls",
    "settle_batch",
]
