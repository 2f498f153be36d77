"""The core loop of issue 2, through the API, the outbox, RQ, the FHIR adapter and the simulator."""

import json

import pytest

from app.db.session import transaction
from app.services import audit
from app.services.users import create_token
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body


@pytest.fixture
def tokens(users, sessions):
    with transaction(sessions) as s:
        out = {name: create_token(s, users[name]) for name in ("rita", "ravi", "lena", "leo", "audrey")}
    out["svc"] = users["svc_token"]
    return out


def api(client, token, method, path, **kw):
    return client.open(
        path, method=method, headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw
    )


def submit(client, tokens, body, key):
    return api(client, tokens["svc"], "POST", "/api/v1/messages", json=body, headers={"Idempotency-Key": key})


def test_rejected_order_is_corrected_approved_replayed_and_resolved(
    client, tokens, fhir_connection, sim_control, run_worker, sessions
):
    tenant = fhir_connection.tenant
    sim_control.set_profile(tenant, require_fields={"MedicationRequest": ["dosageInstruction"]})

    # 1-2. intake, outbox, worker, adapter
    r = submit(
        client, tokens, message_body("mercy-epic", medication_request(1, with_dosage=False)), "order-0001"
    )
    assert r.status_code == 202, r.json
    message_id = r.json["id"]
    assert r.json == {"id": message_id, "idempotency_key": "order-0001", "status": "queued"}
    run_worker()

    # 3. the EHR rejected it: an ehr_rejected exception with an SLA timer
    m = api(client, tokens["svc"], "GET", f"/api/v1/messages/{message_id}").json
    assert m["status"] == "exception" and m["attempts"][0]["status_code"] == 422
    exc_id = m["exception_id"]
    e = api(client, tokens["rita"], "GET", f"/api/v1/exceptions/{exc_id}").json
    assert e["category"] == "ehr_rejected" and e["state"] == "open" and e["sla_due_at"]
    assert e["attempts"][0]["issues"][0]["code"] == "required"
    assert "dosageInstruction" not in e["payload"]

    # 4. resubmit with a correction
    corrected = json.loads(e["payload"])
    corrected["dosageInstruction"] = [{"text": "5 mg by mouth once daily"}]
    r = api(
        client,
        tokens["rita"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={
            "action": "resubmit_corrected",
            "reason": "added the missing dosage",
            "payload": json.dumps(corrected),
        },
    )
    assert r.status_code == 201, r.json
    assert r.json["state"] == "pending_approval"

    # 5. four-eyes: the reviewer cannot approve; a lead needs the password
    r = api(
        client,
        tokens["rita"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "reason": "ok", "password": PASSWORD},
    )
    assert r.status_code == 403
    r = api(
        client,
        tokens["lena"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "reason": "ok", "password": "wrong password"},
    )
    assert r.status_code == 403 and r.json["error"]["code"] == "password_required"
    r = api(
        client,
        tokens["lena"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "reason": "dose verified", "password": PASSWORD},
    )
    assert r.status_code == 201 and r.json["state"] == "replaying"

    # 6. the replay goes through the outbox to the worker and resolves the exception
    run_worker()
    e = api(client, tokens["rita"], "GET", f"/api/v1/exceptions/{exc_id}").json
    assert e["state"] == "resolved"
    assert e["replays"][0]["state"] == "succeeded" and e["replays"][0]["approved_by"] == "lena"
    system = "urn:recon:idempotency:svc"
    assert sim_control.applied_count(tenant, system, "order-0001") == 1

    # 7. the audit trail: verified, and exported with who/what/when/why/before/after
    with transaction(sessions) as s:
        assert audit.verify(s).ok
    r = api(client, tokens["audrey"], "GET", "/api/v1/audit/export?format=jsonl")
    lines = [json.loads(x) for x in r.get_data(as_text=True).splitlines()]
    decisions = [
        x for x in lines if x.get("subject_id") == str(exc_id) and x.get("action", "").startswith("decision.")
    ]
    assert [(d["actor"], d["action"], d["from_state"], d["to_state"]) for d in decisions] == [
        ("rita", "decision.resubmit_corrected", "open", "pending_approval"),
        ("lena", "decision.approve", "pending_approval", "replaying"),
    ]
    assert decisions[0]["reason"] == "added the missing dosage"
    assert lines[-1]["chain_head"]["hash"] == lines[-2]["hash"]


def test_requester_cannot_approve_own_replay(client, tokens, fhir_connection, sim_control, run_worker):
    sim_control.set_profile(fhir_connection.tenant, rate_reject=1.0)
    r = submit(client, tokens, message_body("mercy-epic", medication_request(2)), "order-0002")
    run_worker()
    m = api(client, tokens["svc"], "GET", f"/api/v1/messages/{r.json['id']}").json
    assert m["status"] == "exception", m
    exc_id = m["exception_id"]
    r = api(
        client,
        tokens["lena"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "resubmit", "reason": "EHR was misconfigured, fixed now"},
    )
    assert r.status_code == 201
    r = api(
        client,
        tokens["lena"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "reason": "self", "password": PASSWORD},
    )
    assert r.status_code == 403 and r.json["error"]["code"] == "self_approval"
    r = api(
        client,
        tokens["leo"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "reject", "reason": "not convinced the EHR side is fixed"},
    )
    assert r.status_code == 201 and r.json["state"] == "open"


def test_unknown_outcome_replay_searches_first_and_does_not_resend(
    client, tokens, fhir_connection, sim_control, run_worker
):
    tenant = fhir_connection.tenant
    sim_control.set_profile(tenant, rate_commit_then_drop=1.0)
    r = submit(client, tokens, message_body("mercy-epic", medication_request(3)), "order-0003")
    run_worker()
    m = api(client, tokens["svc"], "GET", f"/api/v1/messages/{r.json['id']}").json
    exc_id = m["exception_id"]
    e = api(client, tokens["rita"], "GET", f"/api/v1/exceptions/{exc_id}").json
    assert e.get("category") == "unknown_outcome", e
    sim_control.set_profile(tenant, preset="default")
    api(
        client,
        tokens["rita"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "resubmit", "reason": "connection dropped; reconcile"},
    )
    api(
        client,
        tokens["lena"],
        "POST",
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "reason": "reconcile by search", "password": PASSWORD},
    )
    run_worker()
    e = api(client, tokens["rita"], "GET", f"/api/v1/exceptions/{exc_id}").json
    assert e["state"] == "resolved"
    assert "found already applied" in e["replays"][0]["result"]
    assert sim_control.deliveries(tenant)["urn:recon:idempotency:svc|order-0003"] == 1
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "order-0003") == 1
