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
import time
import uuid

from rq import Queue, SimpleWorker
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

from app.services import delivery

log = logging.getLogger("recon.queue")

JOB_FUNCTIONS = {
    "deliver": "jobs.delivery.deliver_attempt_job",
    "replay": "jobs.delivery.run_replay_job",
}
JOB_TIMEOUT = 300


def relay_outbox(rt: delivery.Runtime, queue: Queue) -> int:
    """Move unrelayed outbox rows into RQ; safe to run from several workers at once."""
    entries = delivery.pending_outbox(rt)
    done = []
    for entry in entries:
        try:
            queue.enqueue_call(
                JOB_FUNCTIONS[entry.kind],
                args=(int(entry.ref_id),),
                # Namespaced by queue so installations (and test runs) sharing one Redis never collide.
                job_id=f"{queue.name}-{entry.job_id}",
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


def _guarded(step, *args) -> int:
    """One housekeeping step; a database hiccup (lock timeout, failover) must not kill the worker
    and with it the relay and the reaper. The step runs again on the next pass."""
    try:
        return step(*args)
    except Exception:
        log.exception("worker step %s failed; retrying on the next pass", step.__name__)
        return 0


def requeue_stranded(rt: delivery.Runtime, queue: Queue, older_than_seconds: float = 300) -> int:
    """Queue again the work whose RQ job vanished (Redis lost its data, a job was deleted by hand,
    or a worker died between taking a job and claiming its row). Safe: the claim is a
    compare-and-set, so if the old job does run after all, one of the two finds nothing to do."""
    stranded = delivery.stranded_work(rt, older_than_seconds)
    if not stranded:
        return 0
    lost = []
    for kind, ref_id, job_id in stranded:
        try:
            status = Job.fetch(f"{queue.name}-{job_id}", connection=queue.connection).get_status(refresh=True)
        except NoSuchJobError:
            status = None
        if status in (None, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED):
            lost.append((kind, ref_id))
    return delivery.queue_again(rt, lost)


def worker_name() -> str:
    return f"recon-{socket.gethostname()}-{os.getpid()}"


def run_worker(rt: delivery.Runtime, queue: Queue, *, burst: bool, poll_seconds: float = 0.5) -> dict:
    """Relay the outbox, schedule due retries, reap expired leases, escalate breached SLAs and
    run RQ jobs.

    burst: repeat until a whole pass finds nothing to do, then return counts.
    """
    counts = {"relayed": 0, "retries": 0, "reaped": 0, "escalated": 0, "jobs": 0}
    # A fresh RQ worker name per loop: RQ refuses to start a second live worker of the same name.
    worker = SimpleWorker(
        [queue], connection=queue.connection, name=f"{rt.worker_name}-{uuid.uuid4().hex[:6]}"
    )
    while True:
        relayed = _guarded(relay_outbox, rt, queue)
        retries = _guarded(delivery.schedule_due_retries, rt)
        reaped = _guarded(delivery.reap_expired_leases, rt)
        escalated = _guarded(delivery.escalate_breached, rt)
        requeued = _guarded(requeue_stranded, rt, queue)
        if retries or requeued:
            relayed += _guarded(relay_outbox, rt, queue)
        pending = queue.count
        if pending:
            worker.work(burst=True, max_jobs=max(pending, 1), logging_level="WARNING")
        counts["relayed"] += relayed
        counts["retries"] += retries
        counts["reaped"] += reaped
        counts["escalated"] += escalated
        counts["jobs"] += pending
        if burst and not (relayed or retries or reaped or pending or queue.count):
            return counts
        if not (relayed or retries or reaped or pending):
            time.sleep(poll_seconds)
