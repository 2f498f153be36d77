"""Issue 6 'Faults': while a circuit is open, retries are held, not spent, and drain in order when
it closes; half-open lets exactly one probe through across all workers; every opening, re-opening
and closing is audited."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import Attempt, AuditEvent, Connection, ExceptionItem, Message
from app.db.session import transaction
from app.services import delivery
from app.services.clock import utcnow
from tests.samples import medication_request, message_body


def _submit(client, users, key: str, n: int) -> str:
    r = client.post(
        "/api/v1/messages",
        json=message_body("hold-fhir", medication_request(n)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json["id"]


def _circuit_events(sessions) -> list[tuple[str, str | None]]:
    with transaction(sessions, read_only=True) as s:
        return [
            (e.action, e.reason)
            for e in s.scalars(
                sa.select(AuditEvent).where(AuditEvent.action.like("circuit.%")).order_by(AuditEvent.id)
            )
        ]


def _wait_for_half_open(sessions) -> None:
    with transaction(sessions, read_only=True) as s:
        until = s.scalar(sa.select(Connection.circuit_open_until).where(Connection.name == "hold-fhir"))
    if until is not None:
        time.sleep(max((until - utcnow()).total_seconds(), 0) + 0.05)


def test_an_outage_longer_than_the_retry_budget_holds_items_and_drains_them_in_order(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = sim_connection(
        "hold-fhir",
        customer="Hold Health",
        retry_backoff_seconds=0.0,
        max_auto_retries=1,
        circuit_failure_threshold=1,
        circuit_cooldown_seconds=3.0,  # long enough that the next two steps run while it is open
    )
    sim_control.set_profile(tenant, rate_503=1.0, retry_after_seconds=0)
    first = _submit(client, users, "hold-0", 0)
    run_worker()  # 503: the circuit opens
    held = [_submit(client, users, f"hold-{n}", n) for n in range(1, 6)]
    run_worker()  # the circuit is open: all five are held, nothing is sent
    assert sim_control.requests(tenant)["total"] == 1
    with transaction(sessions, read_only=True) as s:
        items = s.scalars(sa.select(ExceptionItem).where(ExceptionItem.message_id.in_(held))).all()
        assert {(i.state, i.retry_count) for i in items} == {("retrying", 0)}
        assert all(i.detail.startswith("held: circuit open") for i in items)

    _wait_for_half_open(sessions)
    run_worker()  # half-open: one probe (the oldest due), still 503 → re-opened; the rest held again
    assert sim_control.requests(tenant)["total"] == 2
    with transaction(sessions, read_only=True) as s:
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == first))
        assert item.state == "open" and "automatic retries stopped" in item.detail  # two real tries
        items = s.scalars(sa.select(ExceptionItem).where(ExceptionItem.message_id.in_(held))).all()
        assert {(i.state, i.retry_count) for i in items} == {("retrying", 0)}  # held: no retry spent

    sim_control.set_profile(tenant, rate_503=0.0)
    _wait_for_half_open(sessions)
    run_worker()  # the probe succeeds, the circuit closes, the held items drain
    with transaction(sessions, read_only=True) as s:
        statuses = dict(s.execute(sa.select(Message.id, Message.status).where(Message.id.in_(held))).all())
        assert set(statuses.values()) == {"delivered"}
        delivered = s.scalars(
            sa.select(Attempt.message_id)
            .where(Attempt.message_id.in_(held), Attempt.outcome == "delivered")
            .order_by(Attempt.finished_at, Attempt.id)
        ).all()
    assert delivered == held  # in the order they were held
    for n in range(1, 6):
        assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", f"hold-{n}") == 1
    assert sim_control.requests(tenant)["total"] == 2 + 5
    assert _circuit_events(sessions) == [
        ("circuit.open", None),
        ("circuit.open", "the half-open probe failed"),
        ("circuit.close", "a call succeeded"),
    ]


def test_half_open_lets_exactly_one_probe_through_across_workers(sessions, sim_connection):
    sim_connection("hold-fhir", customer="Hold Health", circuit_failure_threshold=1)
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "hold-fhir"))
        conn.circuit_open_until = utcnow() - timedelta(seconds=1)  # cooled down: half-open
        conn.consecutive_failures = 1
    with transaction(sessions, read_only=True) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "hold-fhir"))
        s.expunge(conn)

    runtimes = [delivery.Runtime(sessions=sessions, worker_name=f"w{n}") for n in range(8)]
    start, results = threading.Barrier(len(runtimes)), []

    def probe(rt):
        start.wait()
        results.append(delivery.gate(rt, conn, "MedicationRequest"))

    threads = [threading.Thread(target=probe, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert sum(r is None for r in results) == 1  # one call goes to the EHR
    held = [r for r in results if r is not None]
    assert all(r.held and "another call is probing" in r.detail for r in held)
