"""Delivery jobs. Each builds its runtime from the environment, like any worker process."""

from __future__ import annotations

from app.config import Settings
from app.db.session import session_factory
from app.services import delivery

_runtime: delivery.Runtime | None = None


def runtime() -> delivery.Runtime:
    """The worker process's runtime; `recon worker` installs one, jobs fall back to the environment."""
    global _runtime
    if _runtime is None:
        settings = Settings.from_env()
        from app.adapters.queue import worker_name

        _runtime = delivery.Runtime(
            sessions=session_factory(settings.database_url),
            lease_seconds=settings.lease_seconds,
            worker_name=worker_name(),
        )
    return _runtime


def install_runtime(rt: delivery.Runtime) -> None:
    global _runtime
    _runtime = rt


def deliver_attempt_job(attempt_id: int) -> str:
    return delivery.deliver_attempt(runtime(), attempt_id)


def run_replay_job(replay_id: int) -> str:
    return delivery.run_replay(runtime(), replay_id)
