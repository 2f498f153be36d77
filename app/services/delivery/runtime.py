"""What a worker needs to run a flow: sessions, lease length, its name, adapters."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy.orm as so

from app.db.models import Connection
from app.domain.delivery import RETRY_CAP_SECONDS
from app.domain.liveness import HandoffPolicy

from .. import connections

AdapterFactory = Callable[[Connection], object]

# One adapter per connection settings per worker process (default_adapter_factory).
_adapters: dict = {}
# A batch's calls run on a thread pool (batch.py): its threads ask for the adapter at once. Without
# the lock, two of them could each make one and the second close the first's client mid-request
# (a spurious unknown outcome on a worker's first batch).
_adapters_lock = threading.Lock()


def default_adapter_factory(conn: Connection):
    """One adapter per connection settings per worker process: the HTTP connection pool, the
    SMART token and the pinned-version check survive between jobs. Changed settings make a new one."""
    from app.adapters.ehr import adapter_for

    settings = connections.settings_for(conn)
    adapter = _adapters.get(settings)
    if adapter is not None:
        return adapter
    with _adapters_lock:
        adapter = _adapters.get(settings)
        if adapter is None:
            for stale in [k for k in _adapters if k.name == settings.name]:
                _adapters.pop(stale).close()
            adapter = _adapters[settings] = adapter_for(settings)
    return adapter


def cached_adapters(connection_name: str | None = None) -> list:
    """This process's adapters (of one connection, or all)."""
    return [a for k, a in list(_adapters.items()) if connection_name is None or k.name == connection_name]


def close_adapters() -> None:
    """Close and forget every adapter this process made (tests; a worker shutting down)."""
    with _adapters_lock:
        while _adapters:
            _adapters.popitem()[1].close()


DELIVERY_BATCH = 5
DELIVERY_CONCURRENCY = 5


def delivery_settings_from_env(environ=None) -> dict[str, int]:
    """RECON_DELIVERY_BATCH (deliveries per job, 1 = one at a time) and RECON_DELIVERY_CONCURRENCY
    (calls to one connection in flight at once per worker process), each at least 1."""
    environ = os.environ if environ is None else environ
    out = {}
    for key, name, default in (
        ("delivery_batch", "RECON_DELIVERY_BATCH", DELIVERY_BATCH),
        ("delivery_concurrency", "RECON_DELIVERY_CONCURRENCY", DELIVERY_CONCURRENCY),
    ):
        raw = environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
        out[key] = value
    return out


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
    # A number in [0, 1) per retry for the backoff's full jitter (a seeded demo scripts it).
    jitter: Callable[[], float] | None = None
    retry_cap_seconds: float = RETRY_CAP_SECONDS  # no automatic retry waits longer than this
    # Deliveries of one connection a job claims and settles together, and how many of their calls
    # are in flight at once (RECON_DELIVERY_BATCH, RECON_DELIVERY_CONCURRENCY; app/services/delivery/batch.py).
    delivery_batch: int = DELIVERY_BATCH
    delivery_concurrency: int = DELIVERY_CONCURRENCY

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
            **delivery_settings_from_env(),
        )

    @property
    def policy(self) -> HandoffPolicy:
        return HandoffPolicy(
            lease_seconds=self.lease_seconds,
            housekeeping_seconds=self.housekeeping_seconds,
            margin_seconds=self.handoff_margin_seconds,
        )

    def draw(self) -> float:
        """The jitter draw for one retry delay."""
        import random

        return self.jitter() if self.jitter is not None else random.random()
