"""The process's background sealer: seals audit events recorded by deferring units of work
(the intake API) off the request path, many requests' events per seal.

Intake is the hot path: sealing each request's one event in its own transaction after its
commit cost two more transactions (a WAL flush each) per request and made every gunicorn
worker queue on the sealer's lock. A deferring unit of work (`transaction(..., defer_seal=True)`)
instead hands its committed events' highest seq to this thread and returns; the thread waits
COALESCE_SECONDS for more, then seals everything committed so far in one batch (`audit._seal_batch`,
the same batch as everywhere: one sealer at a time across processes, in commit order), with a
try-lock — never waiting for another process's sealer. Under load one seal covers the events of
every request that committed in the meantime.

The window: an intake event is normally sealed within a fifth of a second of the response; it is in
`audit_pending` (counted by `pending_summary`, shown on the audit page) until then. A process
killed in that window leaves its events to the backstops (the next seal anywhere, worker
housekeeping, `recon audit seal`): nothing is lost, the state change and its event committed
together.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

import sqlalchemy.orm as so

log = logging.getLogger(__name__)

COALESCE_SECONDS = 0.1  # a hand-off waits this long for others before sealing
RETRY_SECONDS = 0.05  # another process's sealer holds the lock: look again after this long


class BackgroundSealer:
    """One per (process, database). `request(seq)` never blocks on the database."""

    def __init__(self, factory: so.sessionmaker):
        self._factory = factory
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._newest: int | None = None
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition(self._lock)

    def request(self, seq: int) -> None:
        with self._lock:
            if self._newest is None or seq > self._newest:
                self._newest = seq
            self._ensure_thread()
        self._wake.set()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every requested event is sealed (tests, shutdown). True if it was."""
        with self._idle:
            return self._idle.wait_for(lambda: self._newest is None, timeout)

    def _ensure_thread(self) -> None:
        # A forked child (gunicorn's workers) inherits the object but not the thread.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="recon-audit-sealer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        from app.services.audit import SEAL_BATCH, _seal_batch

        failures = 0
        while True:
            self._wake.wait()
            time.sleep(COALESCE_SECONDS)  # let the requests committing right now join this batch
            self._wake.clear()
            with self._lock:
                newest = self._newest
            if newest is None:
                continue
            try:
                # Never waits for another process's sealer (that cost a transaction per look):
                # a try-lock, and if it is taken, try again shortly — the holder's batch may
                # already hold our events; a successful short batch surely does, since every
                # event handed over here was committed before this read.
                done = _seal_batch(self._factory, SEAL_BATCH)
                failures = 0
            except Exception:  # the events stay pending; a later try or a backstop seals them
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.exception("background audit seal failed (%d in a row)", failures)
                time.sleep(min(0.5 * 2**failures, 30.0))
                self._wake.set()
                continue
            if done is None or done[0] >= SEAL_BATCH:  # locked elsewhere, or more to seal
                if done is None:
                    time.sleep(RETRY_SECONDS)
                self._wake.set()
                continue
            with self._idle:
                if self._newest == newest:  # nothing handed over while sealing
                    self._newest = None
                    self._idle.notify_all()
                else:
                    self._wake.set()

    def seal_now(self) -> None:
        """At exit: seal what this process handed over, in this thread (best effort)."""
        from app.services.audit import seal

        with self._lock:
            newest = self._newest
        if newest is not None:
            try:
                seal(self._factory, wait_for=newest, timeout=2.0)
            except Exception as exc:
                log.warning(
                    "audit seal at exit failed (%s); the backstops will seal the rest", type(exc).__name__
                )


_sealers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its sealer
_registry_lock = threading.Lock()


def for_factory(factory: so.sessionmaker) -> BackgroundSealer:
    key = factory.kw["bind"]
    with _registry_lock:
        sealer = _sealers.get(key)
        if sealer is None:
            sealer = _sealers[key] = BackgroundSealer(factory)
        return sealer


@atexit.register
def _seal_at_exit() -> None:
    with _registry_lock:
        sealers = list(_sealers.values())
    for sealer in sealers:
        sealer.seal_now()
