"""SPEC 3.2: transient failures that provably did not reach the EHR are retried automatically
with backoff; retries that run out come back to a human; a circuit breaker stops hammering."""

import sqlalchemy as sa

from app.db.models import Attempt, AuditEvent, Connection, ExceptionItem
from app.db.session import transaction
from app.services import connections
from tests.samples import medication_request, message_body


def _connection(sim_connection, tenant=None, **options):
    return sim_connection(
        "retry-fhir", customer="Retry Health", tenant=tenant, retry_backoff_seconds=0.0, **options
    )


def _submit(client, users, key):
    r = client.post(
        "/api/v1/messages",
        json=message_body("retry-fhir", medication_request(41)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202
    return r.json["id"]


def test_503s_are_retried_until_delivered(client, users, sessions, sim_connection, sim_control, run_worker):
    # Fault draws depend on the tenant name: a fixed, freshly reset tenant keeps them reproducible.
    tenant = _connection(sim_connection, "retry-503", max_auto_retries=5, circuit_failure_threshold=100)
    sim_control.http.post(f"/_sim/tenants/{tenant}/reset").raise_for_status()
    sim_control.set_profile(tenant, rate_503=0.6, retry_after_seconds=0, seed="retry-a")
    message_id = _submit(client, users, "retry-1")
    run_worker()
    with transaction(sessions) as s:
        attempts = s.scalars(
            sa.select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.id)
        ).all()
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
    assert len(attempts) > 1, "the seeded draws give at least one 503 first"
    assert attempts[-1].outcome == "delivered"
    assert all(a.status_code == 503 for a in attempts[:-1])
    assert item.state == "resolved" and item.category == "ehr_unavailable"
    assert [a.trigger for a in attempts[1:]] == [f"auto_retry:{n}" for n in range(1, len(attempts))]
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "retry-1") == 1


def test_exhausted_retries_come_back_to_a_human(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = _connection(sim_connection, max_auto_retries=2, circuit_failure_threshold=100)
    sim_control.set_profile(tenant, rate_503=1.0, retry_after_seconds=0)
    message_id = _submit(client, users, "retry-2")
    run_worker()
    with transaction(sessions) as s:
        attempts = s.scalars(sa.select(Attempt).where(Attempt.message_id == message_id)).all()
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
    assert len(attempts) == 3
    assert (item.state, item.category) == ("open", "ehr_unavailable")
    assert "automatic retries stopped" in item.detail


def test_rejections_are_never_retried_automatically(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = _connection(sim_connection, max_auto_retries=5)
    sim_control.set_profile(tenant, rate_reject=1.0)
    message_id = _submit(client, users, "retry-3")
    run_worker()
    with transaction(sessions) as s:
        assert (
            s.scalar(sa.select(sa.func.count()).select_from(Attempt).where(Attempt.message_id == message_id))
            == 1
        )
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
    assert (item.state, item.category) == ("open", "ehr_rejected")


def test_circuit_opens_after_consecutive_failures_and_stops_calls(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = _connection(
        sim_connection, max_auto_retries=3, circuit_failure_threshold=2, circuit_cooldown_seconds=3600
    )
    sim_control.set_profile(tenant, rate_503=1.0, retry_after_seconds=0)
    for n in range(3):
        _submit(client, users, f"circuit-{n}")
    run_worker()
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "retry-fhir"))
        assert connections.circuit_state(conn) == "open"
        assert (
            s.scalar(
                sa.select(sa.func.count()).select_from(AuditEvent).where(AuditEvent.action == "circuit.open")
            )
            == 1
        )
        waiting = s.scalars(sa.select(ExceptionItem).where(ExceptionItem.state == "retrying")).all()
        assert len(waiting) == 3 and all(i.next_retry_at is not None for i in waiting)
    assert sim_control.requests(tenant)["total"] == 2  # the third never left: the circuit was open
