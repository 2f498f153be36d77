"""Pooled PostgreSQL connections: checked only after idling (not on every checkout), and a
connection the server dropped meanwhile is replaced without failing the caller."""

import time

import pytest
import sqlalchemy as sa

from app.db import session as session_module

pytestmark = pytest.mark.postgres


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.pg_backend_pid())).scalar()


def test_a_dropped_idle_connection_is_replaced(database_url, monkeypatch):
    monkeypatch.setattr(session_module, "IDLE_PING_SECONDS", 0.05)
    engine = session_module.make_engine(database_url)
    admin = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        first = _backend_pid(engine)
        with admin.connect() as conn:
            assert conn.execute(sa.select(sa.func.pg_terminate_backend(first))).scalar()
        time.sleep(0.2)
        assert _backend_pid(engine) != first  # pinged, found dead, replaced: no error
    finally:
        engine.dispose()
        admin.dispose()


def test_a_connection_in_steady_use_is_not_pinged(database_url):
    engine = session_module.make_engine(database_url)
    statements = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    pings = []
    real_ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda conn: pings.append(1) or real_ping(conn)
    try:
        for _ in range(5):
            _backend_pid(engine)
        assert pings == [] and len(statements) == 5
    finally:
        engine.dispose()
