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
    from rq import get_current_job

    job = get_current_job()
    return job.id if job else None


def deliver_attempt_job(attempt_id: int) -> str:
    faults.checkpoint("dequeued")
    result = delivery.deliver_attempt(runtime(), attempt_id)
    log.info("attempt %s: %s", attempt_id, result, extra={"job_id": _job_id(), "attempt_id": attempt_id})
    return result


def run_replay_job(replay_id: int) -> str:
    faults.checkpoint("dequeued")
    bulk_replay.wait_for_slot(runtime().sessions, replay_id)  # a paced bulk item waits for its slot
    result = delivery.run_replay(runtime(), replay_id)
    log.info("replay %s: %s", replay_id, result, extra={"job_id": _job_id(), "replay_id": replay_id})
    return result
