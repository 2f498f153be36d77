"""Issue 6 'Faults': Redis restarted mid-run loses nothing — the database holds the schedule, RQ only
carries work. Twenty deliveries are relayed into Redis (their outbox rows marked relayed), a worker
has delivered part of them, then Redis dies and comes back empty; more messages arrive; the worker
lives on, queues the lost ones again, and every message reaches the EHR exactly once."""

from __future__ import annotations

import redis
import sqlalchemy as sa
from rq import Queue

from app.adapters.queue import relay_outbox
from app.db.models import Message, OutboxEntry
from app.db.session import transaction
from app.services.delivery import Runtime
from tests.integration.test_liveness import BOUND, OwnRedis
from tests.integration.workers import start_worker, stop, wait_for, wait_until_alive
from tests.samples import medication_request, message_body

FIRST, LATER = 20, 5


def _submit(client, users, n: int) -> str:
    r = client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", medication_request(n)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": f"restart-{n}"},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json["id"]


def _delivered(sessions, message_ids: list[str]) -> int:
    with transaction(sessions, read_only=True) as s:
        return s.scalar(
            sa.select(sa.func.count())
            .select_from(Message)
            .where(Message.id.in_(message_ids), Message.status == "delivered")
        )


def test_redis_restarted_empty_mid_run_loses_no_delivery_and_sends_none_twice(
    client, users, fhir_connection, sessions, database_url, queue_name, sim_control, tmp_path
):
    tenant = fhir_connection.tenant
    sim_control.set_profile(tenant, latency_ms=150)  # the worker is still busy when Redis dies
    own = OwnRedis(tmp_path).start()
    probe = redis.Redis.from_url(own.url)
    worker = None
    try:
        messages = [_submit(client, users, n) for n in range(FIRST)]
        assert relay_outbox(Runtime(sessions=sessions), Queue(queue_name, connection=probe)) == FIRST
        with transaction(sessions, read_only=True) as s:
            assert not s.scalar(
                sa.select(sa.func.count()).select_from(OutboxEntry).where(OutboxEntry.relayed_at.is_(None))
            )

        worker = start_worker(database_url, own.url, queue_name)
        wait_until_alive(probe, queue_name, worker)
        assert wait_for(lambda: _delivered(sessions, messages) >= 3, timeout=60), "nothing delivered"
        own.kill()  # mid-run: jobs queued and one running; Redis comes back with nothing
        at_restart = _delivered(sessions, messages)
        own.start()
        messages += [_submit(client, users, FIRST + n) for n in range(LATER)]
        done = wait_for(lambda: _delivered(sessions, messages) == len(messages), timeout=BOUND + 60)
        alive = worker.poll() is None
    finally:
        probe.close()
        log = stop(worker) if worker is not None else ""
        own.kill()
    assert alive, f"the worker died with Redis: {log[-2000:]}"
    assert done, f"{_delivered(sessions, messages)}/{len(messages)} delivered: {log[-2000:]}"
    assert at_restart < FIRST, "everything was delivered before Redis died: the test proved nothing"
    assert "re-queued" in log, log[-2000:]  # lost jobs were found and queued again
    applied = sim_control.deliveries(tenant, what="applied")
    assert applied == {f"urn:recon:idempotency:svc|restart-{n}": 1 for n in range(FIRST + LATER)}
