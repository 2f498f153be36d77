"""Engines, sessions and the one transaction helper.

SQLite: WAL, busy timeout, and BEGIN IMMEDIATE so writers serialize instead of
failing on lock upgrades. PostgreSQL: READ COMMITTED with row locks on the
audit chain head.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
import sqlalchemy.orm as so

_engines: dict[str, sa.Engine] = {}
_LOCK_HEAD = sa.text("SELECT last_id FROM audit_head WHERE id = 1 FOR UPDATE")
_lock = threading.Lock()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> sa.Engine:
    """Create an engine with the per-dialect settings this product relies on."""
    if is_sqlite(url):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

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
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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
def transaction(factory: so.sessionmaker[so.Session], *, read_only: bool = False) -> Iterator[so.Session]:
    """One unit of work: commit on success, roll back on any error.

    read_only: a reader on SQLite does not take the write lock (it must not write).
    """
    engine = factory.kw["bind"]
    if read_only:
        session = factory(bind=engine.execution_options(recon_read_only=True))
    else:
        session = factory()
    # SQLite writers in one process queue on a lock instead of sleep-polling the file lock
    # (SQLite's busy handler backs off in steps up to 100 ms, which is what made the tail).
    writer_lock = _sqlite_writer_lock(engine) if not read_only else None
    if writer_lock is not None:
        writer_lock.acquire()
    try:
        with session.begin():
            if not read_only and session.get_bind().dialect.name == "postgresql":
                # Every writer takes the audit chain head first. Almost every write appends to
                # the chain anyway, so this costs no concurrency — and one lock order for all
                # transactions means no deadlocks (row lock, then head / head, then row).
                # SQLite's BEGIN IMMEDIATE already gives writers that single order.
                session.execute(_LOCK_HEAD)
            yield session
    finally:
        session.close()
        if writer_lock is not None:
            writer_lock.release()


_writer_locks: dict[str, threading.RLock] = {}


def _sqlite_writer_lock(engine: sa.Engine) -> threading.RLock | None:
    if engine.dialect.name != "sqlite":
        return None
    key = str(engine.url)
    with _lock:
        return _writer_locks.setdefault(key, threading.RLock())
