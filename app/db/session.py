"""Engines, sessions and the one transaction helper.

SQLite: WAL, busy timeout, and BEGIN IMMEDIATE so writers serialize instead of
failing on lock upgrades. PostgreSQL: READ COMMITTED; no lock is common to all writers
(the audit chain is extended after commit by one sealer at a time: app/services/audit.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
import sqlalchemy.orm as so

log = logging.getLogger(__name__)

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()
_AFTER_COMMIT = "recon_after_commit"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> sa.Engine:
    """Create an engine with the per-dialect settings this product relies on."""
    if is_sqlite(url):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            # Writers take the lock up front (no deadlocking lock upgrades); readers do not block.
            read_only = conn.get_execution_options().get("recon_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    # hide_parameters: a database error never carries a payload value or patient reference into logs.
    engine = sa.create_engine(url, pool_size=10, max_overflow=20, hide_parameters=True)
    _cache_large_statements()
    _ping_when_idle(engine, IDLE_PING_SECONDS)
    return engine


def _cache_large_statements() -> None:
    """psycopg converts a statement's `%(name)s` placeholders once and caches the result, but
    only for statements of at most 50 parameters: intake's one-statement insert has ~55, and
    re-parsing its 3 kB of SQL on every request cost a tenth of the request's CPU. The limit is
    a module constant (psycopg 3.1-3.3); raising it keeps the cache bounded (LRU, 128 entries)."""
    try:
        from psycopg import _queries
    except ImportError:  # pragma: no cover - another driver
        return
    if getattr(_queries, "MAX_CACHED_STATEMENT_PARAMS", 0) < 200:
        _queries.MAX_CACHED_STATEMENT_PARAMS = 200
    if getattr(_queries, "MAX_CACHED_STATEMENT_LENGTH", 0) < 16384:
        _queries.MAX_CACHED_STATEMENT_LENGTH = 16384


# A pooled connection idle for longer than this is checked (SELECT 1) before use, and replaced if
# the server dropped it. `pool_pre_ping` checked every checkout: one round trip per transaction
# (three per intake request), while a connection in steady use was never the stale one. A server
# restart under load still fails the statements in flight; SQLAlchemy then invalidates the pool.
IDLE_PING_SECONDS = 5.0


def _ping_when_idle(engine: sa.Engine, seconds: float) -> None:
    @sa.event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn, record):
        record.info["recon_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, proxy):
        since = record.info.get("recon_idle_since")
        if since is None or time.monotonic() - since <= seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool replaces the connection and tries again
            raise sa.exc.DisconnectionError("stale pooled connection") from exc


def get_engine(url: str) -> sa.Engine:
    """One engine per URL per process."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(url: str) -> so.sessionmaker[so.Session]:
    return so.sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(
    factory: so.sessionmaker[so.Session], *, read_only: bool = False, defer_seal: bool = False
) -> Iterator[so.Session]:
    """One unit of work: commit on success, roll back on any error; then, after a commit, run
    the hooks registered with `after_commit` (the audit sealer).

    read_only: a reader on SQLite does not take the write lock (it must not write).
    defer_seal: the audit events it records are sealed by the process's background sealer
    (app/services/sealer.py) instead of before this call returns — the intake API's hot path.
    """
    engine = factory.kw["bind"]
    if read_only:
        session = factory(bind=engine.execution_options(recon_read_only=True))
    else:
        session = factory()
    if defer_seal:
        session.info[DEFER_SEAL] = True
    # SQLite writers in one process queue on a lock instead of sleep-polling the file lock
    # (SQLite's busy handler backs off in steps up to 100 ms, which is what made the tail).
    writer_lock = _sqlite_writer_lock(engine) if not read_only else None
    if writer_lock is not None:
        writer_lock.acquire()
    hooks: dict = {}
    try:
        with session.begin():
            # No lock common to every writer: each use case takes the row locks of its own
            # compare-and-set updates only (docs/ARCHITECTURE.md "Concurrency on two databases").
            yield session
        hooks = session.info.get(_AFTER_COMMIT) or {}
    finally:
        session.close()
        if writer_lock is not None:
            writer_lock.release()
    for key, hook in hooks.items():
        try:
            hook(factory)
        except Exception:  # the unit of work is committed; a backstop redoes what the hook missed
            log.exception("after-commit hook %s failed", key)


DEFER_SEAL = "recon_defer_seal"


def after_commit(session: so.Session, key: str, hook: Callable[[so.sessionmaker], None]) -> None:
    """Run `hook(factory)` once after this session's transaction commits (never on rollback),
    outside it and holding no lock. One hook per key: a later registration replaces it."""
    session.info.setdefault(_AFTER_COMMIT, {})[key] = hook


_writer_locks: dict[str, threading.RLock] = {}


def _sqlite_writer_lock(engine: sa.Engine) -> threading.RLock | None:
    if engine.dialect.name != "sqlite":
        return None
    key = str(engine.url)
    with _lock:
        return _writer_locks.setdefault(key, threading.RLock())
