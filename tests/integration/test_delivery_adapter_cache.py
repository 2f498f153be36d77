"""The worker process's adapter cache (app/services/delivery/runtime.py) under a batch's thread
pool: the calls of a worker's first batch ask for the connection's adapter at once, and exactly one
adapter is made — none closed under another thread's request (which made a spurious
unknown_outcome: `adapter error: RuntimeError('Cannot send a request, as the client has been
closed.')`, seen once in the four-worker delivery benchmark)."""

from __future__ import annotations

import threading
import time

import app.adapters.ehr as ehr
from app.db.models import Connection
from app.services import delivery


class _Adapter:
    def __init__(self, made: list):
        self.closed = False
        made.append(self)

    def close(self) -> None:
        self.closed = True


def test_concurrent_first_calls_share_one_adapter(sessions, fhir_connection, monkeypatch):
    made: list[_Adapter] = []

    def slow_adapter_for(settings, **_kw):
        time.sleep(0.05)  # building a client takes a while: the other threads ask meanwhile
        return _Adapter(made)

    monkeypatch.setattr(ehr, "adapter_for", slow_adapter_for)
    delivery.close_adapters()
    with sessions() as s:
        conn = s.get(Connection, fhir_connection.id)
        s.expunge(conn)
    start = threading.Barrier(8)
    got = []

    def first_call():
        start.wait()
        got.append(delivery.default_adapter_factory(conn))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    try:
        assert len(made) == 1
        assert all(a is made[0] for a in got) and len(got) == 8
        assert not made[0].closed
    finally:
        delivery.close_adapters()
