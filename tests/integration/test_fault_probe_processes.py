"""Issue 6 'Faults': two worker PROCESSES see one breaker and let exactly one half-open probe through.

The circuit of a connection is half-open (cooled down after opening). Two spawned processes, each
with its own engine and adapter, deliver their share of the queued attempts at the same moment
through the worker's own flow. The EHR answers the one probe slowly and with 503, which opens the
circuit again. Exactly one create reaches the EHR; every other attempt is held (not sent, no retry
spent) — in the other process because a probe is in flight, and afterwards because the circuit is
open again — and the re-opening is audited once."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import Attempt, AuditEvent, Connection, ExceptionItem
from app.db.session import transaction
from app.services.clock import utcnow
from tests.samples import medication_request, message_body

PROBE_SECONDS = 3.0  # the EHR takes this long to answer the probe: the other process runs meanwhile


def _deliver_share(database_url: str, attempt_ids: list[int], start, results) -> None:
    """A worker process: its own engine and adapters; waits for the other, then delivers."""
    from app.db.session import session_factory
    from app.services.delivery import Runtime, deliver_attempt

    rt = Runtime(sessions=session_factory(database_url), worker_name=f"probe-{attempt_ids[0]}")
    start.wait(timeout=60)
    results.put([(attempt_id, deliver_attempt(rt, attempt_id)) for attempt_id in attempt_ids])


def test_two_worker_processes_let_exactly_one_half_open_probe_through(
    client, users, sessions, database_url, sim_connection, sim_control
):
    tenant = sim_connection(
        "probe-fhir",
        customer="Probe Health",
        circuit_failure_threshold=1,
        circuit_cooldown_seconds=600.0,  # re-opened by the failed probe: nothing else goes this run
        read_timeout=10.0,
    )
    sim_control.set_profile(tenant, rate_503=1.0, latency_ms=int(PROBE_SECONDS * 1000))
    message_ids = []
    for n in range(8):
        r = client.post(
            "/api/v1/messages",
            json=message_body("probe-fhir", medication_request(n)),
            headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": f"probe-{n}"},
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        message_ids.append(r.json["id"])
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "probe-fhir"))
        conn.consecutive_failures = 1
        conn.circuit_open_until = utcnow() - timedelta(seconds=1)  # cooled down: half-open
        attempt_ids = list(
            s.scalars(sa.select(Attempt.id).where(Attempt.message_id.in_(message_ids)).order_by(Attempt.id))
        )

    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    workers = [
        spawn.Process(target=_deliver_share, args=(database_url, attempt_ids[n::2], start, results))
        for n in range(2)
    ]
    for process in workers:
        process.start()
    outcomes = dict(pair for _ in workers for pair in results.get(timeout=120))
    for process in workers:
        process.join(timeout=30)
        assert process.exitcode == 0

    assert sim_control.requests(tenant)["total"] == 1  # the one probe
    assert sorted(outcomes) == sorted(attempt_ids)
    with transaction(sessions, read_only=True) as s:
        items = s.scalars(sa.select(ExceptionItem).where(ExceptionItem.message_id.in_(message_ids))).all()
        reopened = s.scalars(
            sa.select(AuditEvent.reason).where(AuditEvent.action == "circuit.open").order_by(AuditEvent.id)
        ).all()
    assert all(i.state == "retrying" and i.retry_count == 0 for i in items)  # held or retried: none spent
    held = [i.detail for i in items if i.detail.startswith("held:")]
    assert len(held) == 7
    probing = [d for d in held if "another call is probing" in d]
    # The other process met the probe in flight (it finished its share within the probe's 3 s).
    assert probing, held
    assert all("another call is probing" in d or "circuit open" in d for d in held)
    assert reopened == ["the half-open probe failed"]
