"""Delivery jobs. Each builds its runtime from the environment, like any worker process."""

from __future__ import annotations

import logging

from app.config import Settings
from app.services import bulk_replay, delivery, faults

log = logging.getLogger("recon.jobs")
_runtime: delivery.Runtime | None = None


def runtime() -> delivery.Runtime:
    """The worker process's runtime; `recon worker` installs one, jobs fall back to the environment."""
    global _runtime
    if _runtime is None:
        settings = Settings.from_env()
        from app.adapters.queue import worker_name

        _runtime = delivery.Runtime.from_settings(settings, worker_name())
    return _runtime


def install_runtime(rt: delivery.Runtime) -> None:
    global _runtime
    _runtime = rt


def _job_id() -> str | None:
    job = _current_job()
    return job.id if job else None


def deliver_attempt_job(attempt_id: int) -> str:
    faults.checkpoint("dequeued")
    # With other queued deliveries of the same connection where it allows (app/services/delivery/batch.py).
    result = delivery.deliver_batch(runtime(), attempt_id, on_claimed=drop_claimed_jobs)
    log.info("attempt %s: %s", attempt_id, result, extra={"job_id": _job_id(), "attempt_id": attempt_id})
    return result


def drop_claimed_jobs(attempt_ids: list[int]) -> None:
    """Attempts this job claimed for its batch: their own jobs, still waiting in the queue, would
    only find nothing to claim — take them out of the queue (one pipeline). A job a worker has
    already taken runs and finds its attempt claimed (a no-op); work that is claimed is never
    re-queued (the lease and the reaper cover it), so removing its job loses nothing."""
    from rq import Queue
    from rq.job import Job

    from app.adapters.queue import rq_job_id
    from app.domain.delivery import deliver_job_id

    job = _current_job()
    if job is None or not attempt_ids:
        return
    queue = Queue(job.origin, connection=job.connection)
    ids = [rq_job_id(queue.name, deliver_job_id(attempt_id)) for attempt_id in attempt_ids]
    try:
        with job.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.lrem(queue.key, 1, job_id)
            removed = pipe.execute()
            for job_id, n in zip(ids, removed, strict=True):
                if n:
                    pipe.delete(Job.key_for(job_id))
            pipe.execute()
    except Exception:  # an optimisation only: the jobs left run as no-ops
        log.warning("could not drop the jobs of a batch's attempts", exc_info=True)


def _current_job():
    from rq import get_current_job

    return get_current_job()


def run_replay_job(replay_id: int) -> str:
    faults.checkpoint("dequeued")
    bulk_replay.wait_for_slot(runtime().sessions, replay_id)  # a paced bulk item waits for its slot
    result = delivery.run_replay(runtime(), replay_id)
    log.info("replay %s: %s", replay_id, result, extra={"job_id": _job_id(), "replay_id": replay_id})
    return result
