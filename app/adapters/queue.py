"""RQ: the outbox relay and the worker loop (SPEC 2, 9.2).

Jobs carry no RQ Retry (RQ would re-run an abandoned job that has retries left);
a job id is the queue name plus the outbox row's job_id (`recon-replay-<id>`,
`recon-deliver-<attempt id>`) and
jobs are enqueued with unique=True, so relaying twice enqueues once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, SimpleWorker
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.utils import str_to_date

from app.domain.liveness import JobStatus as LiveStatus
from app.domain.liveness import JobView, requeue_reason
from app.services import audit, bulk_replay, delivery, liveness, phi, schedule, summaries
from app.services.clock import utcnow

log = logging.getLogger("recon.queue")

JOB_FUNCTIONS = {
    "deliver": "jobs.delivery.deliver_attempt_job",
    "replay": "jobs.delivery.run_replay_job",
}
JOB_TIMEOUT = 300


def rq_job_id(queue_name: str, job_id: str) -> str:
    """An outbox row's job id in RQ: namespaced by queue, so installations (and test runs)
    sharing one Redis never collide."""
    return f"{queue_name}-{job_id}"


def relay_outbox(rt: delivery.Runtime, queue: Queue) -> int:
    """Move unrelayed outbox rows into RQ; safe to run from several workers at once."""
    entries = delivery.pending_outbox(rt)
    done = []
    for entry in entries:
        try:
            queue.enqueue_call(
                JOB_FUNCTIONS[entry.kind],
                args=(int(entry.ref_id),),
                job_id=rq_job_id(queue.name, entry.job_id),
                unique=True,
                timeout=JOB_TIMEOUT,
                result_ttl=3600,
                failure_ttl=7 * 24 * 3600,
                description=f"{entry.kind} {entry.ref_id}",
            )
        except DuplicateJobError:
            pass  # another relay got there first; the job exists once
        done.append(entry.id)
    delivery.mark_relayed(rt, done)
    return len(done)


def seal_audit(rt: delivery.Runtime) -> int:
    """Seal recorded audit events into the chain (the sealer's backstop; see services/audit.py)."""
    return audit.seal(rt.sessions)


def write_audit_checkpoint(rt: delivery.Runtime, path) -> int:
    """Anchor the audit chain head outside the database (log stream + append-only file)."""
    audit.write_checkpoint(rt.sessions, path)
    return 1


def _checkpoint_settings() -> tuple[object, float]:
    """RECON_AUDIT_CHECKPOINT_FILE / _SECONDS, as app/config.py reads them."""
    from app.config import audit_checkpoint_from_env

    return audit_checkpoint_from_env()


def _guarded(step, *args) -> int:
    """One housekeeping step; a database hiccup (lock timeout, failover) must not kill the worker
    and with it the relay and the reaper. The step runs again on the next pass."""
    try:
        return step(*args)
    except (RedisConnectionError, RedisTimeoutError) as exc:  # an outage: one line, not a traceback a pass
        log.warning("worker step %s: Redis unavailable (%s); retrying on the next pass", step.__name__, exc)
        return 0
    except Exception:
        log.exception("worker step %s failed; retrying on the next pass", step.__name__)
        return 0


def _heartbeat_key(queue: Queue, worker: str) -> str:
    return f"recon:worker-alive:{queue.name}:{worker}"


def beat(rt: delivery.Runtime, queue: Queue) -> None:
    """This worker is alive: a key that lapses after the worker timeout unless renewed."""
    ttl_ms = max(int(rt.policy.worker_timeout_seconds * 1000), 100)
    queue.connection.set(_heartbeat_key(queue, rt.worker_name), "1", px=ttl_ms)


def _recon_worker_of(rq_worker_name: str | None) -> str | None:
    """The recon worker behind an RQ worker name (`<recon worker>.<loop id>`)."""
    if not rq_worker_name:
        return None
    return rq_worker_name.rpartition(".")[0] or None


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def job_views(queue: Queue, job_ids: list[str]) -> dict[str, JobView]:
    """What the queue knows about these jobs, in the terms of the liveness rule — in a handful of
    round trips whatever their number (one pipeline of job hashes, the two lists once, one pipeline
    of heartbeats), so a backlog does not make every housekeeping pass slow."""
    if not job_ids:
        return {}
    conn = queue.connection
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "worker_name", "started_at")
        rows = pipe.execute()
    text = [[_text(v) for v in row] for row in rows]
    waiting: set[str] = set()
    transit: set[str] = set()
    if any(status == LiveStatus.QUEUED.value for status, _, _ in text):
        waiting = {_text(v) for v in conn.lrange(queue.key, 0, -1)}
        transit = {_text(v) for v in conn.lrange(queue.intermediate_queue_key, 0, -1)}
    owners = sorted({_recon_worker_of(name) for status, name, _ in text if status == "started"} - {None})
    alive: dict[str, bool] = {}
    if owners:
        with conn.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(_heartbeat_key(queue, owner))
            alive = {owner: bool(n) for owner, n in zip(owners, pipe.execute(), strict=True)}
    now = utcnow()
    views = {}
    for job_id, (raw_status, rq_worker, started_at) in zip(job_ids, text, strict=True):
        if not raw_status:
            views[job_id] = JobView(status=None)
            continue
        try:
            status = LiveStatus(raw_status)
        except ValueError:
            status = LiveStatus.OTHER
        if status is LiveStatus.QUEUED:
            views[job_id] = JobView(status, waiting_in_queue=job_id in waiting, in_transit=job_id in transit)
        elif status is LiveStatus.STARTED:
            owner = _recon_worker_of(rq_worker)
            started = str_to_date(started_at).replace(tzinfo=None) if started_at else None
            views[job_id] = JobView(
                status,
                worker_alive=alive.get(owner) if owner else None,
                started_seconds=(now - started).total_seconds() if started else None,
            )
        else:
            views[job_id] = JobView(status)
    return views


def requeue_stranded(rt: delivery.Runtime, queue: Queue) -> int:
    """Queue again the ready work whose hand-off was lost: its job vanished (Redis lost its data, a
    job deleted by hand), ended without claiming it, or was taken by a worker that died before the
    claim. Safe: every claim is a compare-and-set, so if the old job does run after all, one of the
    two finds nothing to do. The rule and the bound: app/domain/liveness.py."""
    policy = rt.policy
    now = utcnow()
    lost, to_ask = [], []
    for work in liveness.unclaimed_work(rt.sessions):
        if work.job_id is None:
            if work.has_outbox_entry:
                continue  # waiting for the relay, which runs in the same pass
            # Ready with no outbox row at all (should not happen: they commit together) — repair it.
            if (now - work.ready_at).total_seconds() >= policy.housekeeping_seconds:
                lost.append((work, "no outbox entry"))
            continue
        if (now - work.relayed_at).total_seconds() >= policy.housekeeping_seconds:
            to_ask.append(work)  # judged only after one pass: a fresh job gets its chance first
    views = job_views(queue, [rq_job_id(queue.name, work.job_id) for work in to_ask])
    for work in to_ask:
        unclaimed = (now - work.relayed_at).total_seconds()
        reason = requeue_reason(views[rq_job_id(queue.name, work.job_id)], unclaimed, policy)
        if reason:
            lost.append((work, reason))
    return liveness.queue_again(rt.sessions, lost)


def refresh_summaries(rt: delivery.Runtime) -> int:
    """Recount the queue counts and the dashboard's figures (app/services/summaries.py)."""
    result = summaries.refresh(rt.sessions)
    if result.milliseconds > 1000:
        log.warning("summary refresh took %d ms (%d groups)", result.milliseconds, result.groups)
    return result.groups


def worker_name() -> str:
    return f"recon-{socket.gethostname()}-{os.getpid()}"


ESCALATE_EVERY_SECONDS = 30.0

# Steps one worker runs per interval for all of them (app/services/schedule.py), not every worker
# on every pass. Due retries and the re-queue of lost hand-offs become claimable half a pass after
# their last run, so while any worker lives they run at least every 1.5 passes (the bound's margin
# M absorbs the extra half pass) and at most twice a pass across the fleet.
SHARED_STEPS = ("retries", "stranded", "escalate", "summaries")
# Also shared, with no row seeded by a migration (schedule.claim adds it on its first win):
# an audit checkpoint every RECON_AUDIT_CHECKPOINT_SECONDS (docs/SECURITY.md).
CHECKPOINT_STEP = "audit_checkpoint"
# and the pacing step of bulk replays (app/services/bulk_replay.py), every half pass like retries.
BULK_REPLAY_STEP = "bulk_replays"
# and the payload retention purge (app/services/phi.py), hourly.
PURGE_STEP, PURGE_EVERY_SECONDS = "payload_purge", 3600.0


class Housekeeping:
    """The worker's bookkeeping, on its own cadence: heartbeat, relay the outbox, reap expired
    leases — every pass of every worker; schedule due retries, re-queue lost hand-offs, escalate
    breached SLAs, refresh the read summaries — each by one worker per interval (the schedule).

    In a long-running worker it runs on a thread every `housekeeping_seconds`, whatever job the
    worker is running — the bound on every hand-off depends on that cadence, not on job lengths.
    A burst run (`shared=False`: one process draining, typically alone) runs retries and the re-queue
    on every pass and escalation and summaries on its own timers, its first pass included.
    """

    def __init__(self, rt: delivery.Runtime, queue: Queue, *, shared: bool = True):
        self.rt, self.queue, self.shared = rt, queue, shared
        self._last_local = {"escalate": None, "summaries": None, CHECKPOINT_STEP: None}
        self.checkpoint_file, self.checkpoint_seconds = _checkpoint_settings()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def intervals(self) -> dict[str, float]:
        half_pass = self.rt.housekeeping_seconds / 2
        return {
            "retries": half_pass,
            "stranded": half_pass,
            "escalate": ESCALATE_EVERY_SECONDS,
            "summaries": summaries.refresh_seconds(),
            CHECKPOINT_STEP: self.checkpoint_seconds,
            delivery.VERSION_CHECK_STEP: delivery.versions.CHECK_STEP_SECONDS,
            BULK_REPLAY_STEP: half_pass,
            PURGE_STEP: PURGE_EVERY_SECONDS,
        }

    def _steps_to_run(self) -> set[str]:
        intervals = self.intervals()
        if self.shared:
            return set(_guarded(schedule.claim, self.rt.sessions, intervals, self.rt.worker_name) or [])
        steps = {"retries", "stranded", BULK_REPLAY_STEP}
        now = time.monotonic()
        for name, last in self._last_local.items():
            if last is None or now - last >= intervals[name]:
                self._last_local[name] = now
                steps.add(name)
        return steps

    def run_once(self) -> dict:
        """One pass. Every step is guarded: a database or Redis hiccup never stops the others."""
        rt, queue = self.rt, self.queue
        _guarded(beat, rt, queue)
        _guarded(seal_audit, rt)  # backstop: events are normally sealed right after each commit
        counts = {
            "relayed": _guarded(relay_outbox, rt, queue),
            "retries": 0,
            "reaped": 0,
            "escalated": 0,
            "requeued": 0,
        }
        steps = self._steps_to_run()
        if "retries" in steps:
            _guarded(delivery.end_expired_pauses, rt)  # a window's end is audited like a resume
            counts["retries"] = _guarded(delivery.schedule_due_retries, rt)
        counts["reaped"] = _guarded(delivery.reap_expired_leases, rt)
        if "stranded" in steps:
            counts["requeued"] = _guarded(requeue_stranded, rt, queue)
        if "escalate" in steps:
            counts["escalated"] = _guarded(delivery.escalate_breached, rt)
        if "summaries" in steps:
            _guarded(refresh_summaries, rt)
        if CHECKPOINT_STEP in steps:
            _guarded(write_audit_checkpoint, rt, self.checkpoint_file)  # not work a burst waits for
        if delivery.VERSION_CHECK_STEP in steps:  # long-running workers only: a burst drains and exits
            _guarded(delivery.check_pinned_versions, rt)
        released = _guarded(bulk_replay.housekeeping_step, rt) if BULK_REPLAY_STEP in steps else 0
        if PURGE_STEP in steps:
            _guarded(phi.purge_payloads, rt.sessions)
        if counts["retries"] or counts["requeued"] or released:
            counts["relayed"] += _guarded(relay_outbox, rt, queue)
        return counts

    def start(self) -> Housekeeping:
        self._thread = threading.Thread(target=self._loop, name="recon-housekeeping", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.run_once()
            self._stop.wait(max(self.rt.housekeeping_seconds - (time.monotonic() - started), 0.05))


def _rq_worker(rt: delivery.Runtime, queue: Queue) -> SimpleWorker:
    # A fresh RQ worker name per loop: RQ refuses to start a second live worker of the same name.
    # `<recon worker>.<loop id>`: requeue_stranded maps a started job back to our heartbeat.
    return SimpleWorker([queue], connection=queue.connection, name=f"{rt.worker_name}.{uuid.uuid4().hex[:6]}")


def _run_jobs(worker: SimpleWorker, queue: Queue) -> int:
    pending = queue.count
    if pending:
        worker.work(burst=True, max_jobs=pending, logging_level="WARNING")
    return pending


def run_worker(rt: delivery.Runtime, queue: Queue, *, burst: bool, poll_seconds: float = 0.5) -> dict:
    """Housekeeping plus RQ jobs.

    burst: alternate one housekeeping pass and the queued jobs until a whole pass finds nothing to
    do, then return counts. Otherwise housekeeping runs on its own thread and this loop runs jobs
    until the process is stopped; losing Redis pauses it, never ends it.
    """
    counts = {"relayed": 0, "retries": 0, "reaped": 0, "escalated": 0, "requeued": 0, "jobs": 0}
    housekeeping = Housekeeping(rt, queue, shared=not burst)
    worker = _rq_worker(rt, queue)
    if burst:
        while True:
            done = housekeeping.run_once()
            for key, value in done.items():
                counts[key] += value
            jobs = _run_jobs(worker, queue)
            counts["jobs"] += jobs
            if not (done["relayed"] or done["retries"] or done["reaped"] or jobs or queue.count):
                deferred = delivery.next_deferred_at(rt)
                if deferred is None:
                    return counts
                # A replay waits out an earlier request's window (seconds): drain it too.
                time.sleep(min(max((deferred - utcnow()).total_seconds(), poll_seconds), 60))
    housekeeping.start()
    outage = False
    try:
        while True:
            try:
                if worker is None:  # after an outage: a fresh RQ worker registers on the new server
                    worker = _rq_worker(rt, queue)
                if not _run_jobs(worker, queue):
                    time.sleep(poll_seconds)
                if outage:
                    log.warning("Redis is back; running jobs again")
                    outage = False
            except (RedisConnectionError, RedisTimeoutError):
                if not outage:
                    log.warning("Redis unavailable; jobs paused, housekeeping keeps retrying", exc_info=True)
                outage, worker = True, None
                time.sleep(1.0)
    finally:
        housekeeping.stop()
