"""Edge paths of delivery that the review found: stranded jobs, late results, corrected replays
whose original is already in the EHR, and may-have-applied outcomes on connections without search."""

import json
from datetime import timedelta

import sqlalchemy as sa

from app.adapters.queue import relay_outbox
from app.db.models import Attempt, ExceptionItem, OutboxEntry, User
from app.db.session import transaction
from app.domain.delivery import AttemptOutcome, Outcome
from app.services import delivery
from app.services.clock import utcnow
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body

SYSTEM = "urn:recon:idempotency:svc"


def _submit(client, users, connection, key, resource=None):
    r = client.post(
        "/api/v1/messages",
        json=message_body(connection, resource or medication_request(51)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202
    return r.json["id"]


def _exception(sessions, message_id):
    with transaction(sessions) as s:
        return s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))


def test_work_whose_job_vanished_is_queued_again(
    client, users, fhir_connection, sessions, runtime, queue, run_worker, sim_control
):
    _submit(client, users, "mercy-epic", "stranded-1")
    assert relay_outbox(runtime, queue) == 1
    queue.empty()  # Redis lost the job
    with transaction(sessions) as s:
        s.execute(sa.update(OutboxEntry).values(relayed_at=utcnow() - timedelta(minutes=10)))
    run_worker()
    assert sim_control.applied_count(fhir_connection.tenant, SYSTEM, "stranded-1") == 1


def test_late_delivered_result_settles_the_unknown_outcome_the_reaper_left(
    client, users, fhir_connection, sessions, runtime
):
    message_id = _submit(client, users, "mercy-epic", "late-1")
    with transaction(sessions) as s:
        attempt = s.scalar(sa.select(Attempt).where(Attempt.message_id == message_id))
        attempt_id = attempt.id
        attempt.outcome, attempt.lease_expires_at = "in_flight", utcnow() - timedelta(seconds=1)
    assert delivery.reap_expired_leases(runtime) == 1
    assert _exception(sessions, message_id).category == "unknown_outcome"
    with transaction(sessions) as s:
        assert (
            delivery.late_result(
                s, attempt_id, message_id, Outcome(AttemptOutcome.DELIVERED, detail="HTTP 201")
            )
            == "late"
        )
    item = _exception(sessions, message_id)
    assert item.state == "resolved"
    with transaction(sessions) as s:
        assert s.get(Attempt, attempt_id).outcome == "delivered"


def test_corrected_replay_is_not_resolved_by_finding_the_original(
    client, users, fhir_connection, sessions, run_worker, sim_control
):
    sim_control.set_profile(fhir_connection.tenant, rate_commit_then_drop=1.0)
    message_id = _submit(client, users, "mercy-epic", "corr-1")
    run_worker()
    item = _exception(sessions, message_id)
    assert item.category == "unknown_outcome"
    corrected = medication_request(51)
    corrected["dosageInstruction"] = [{"text": "10 mg once daily"}]
    with transaction(sessions) as s:
        decide(
            s,
            item.id,
            s.get(User, users["rita"].id),
            DecisionInput("resubmit_corrected", reason="dose was wrong", payload=json.dumps(corrected)),
        )
    with transaction(sessions) as s:
        decide(
            s,
            item.id,
            s.get(User, users["lena"].id),
            DecisionInput("approve", reason="ok", password=PASSWORD),
        )
    sim_control.set_profile(fhir_connection.tenant, preset="default")
    run_worker()
    item = _exception(sessions, message_id)
    assert (item.state, item.category) == ("open", "duplicate_suspected")
    assert sim_control.deliveries(fhir_connection.tenant) == {f"{SYSTEM}|corr-1": 1}


def test_a_500_on_a_connection_without_search_needs_confirm_not_applied(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = sim_connection(
        "blind-fhir",
        customer="Blind Clinic",
        conditional_create=False,
        identifier_search=False,
        max_auto_retries=0,
    )
    sim_control.set_profile(tenant, rate_500=1.0)
    message_id = _submit(client, users, "blind-fhir", "blind-1")
    run_worker()
    item = _exception(sessions, message_id)
    assert item.category == "ehr_unavailable" and item.needs_not_applied_confirmation


def test_a_rejection_on_a_connection_without_search_needs_no_confirmation(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = sim_connection("blind-fhir", customer="Blind Clinic", identifier_search=False)
    sim_control.set_profile(tenant, rate_reject=1.0)
    message_id = _submit(client, users, "blind-fhir", "blind-2")
    run_worker()
    item = _exception(sessions, message_id)
    assert item.category == "ehr_rejected" and not item.needs_not_applied_confirmation
