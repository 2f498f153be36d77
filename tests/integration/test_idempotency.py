"""SPEC 2 and 9.3: idempotency keys at intake, over a real HTTP server."""

import base64
import json
import threading

import httpx
import sqlalchemy as sa

from app.db.models import Message, PayloadVersion
from app.db.session import transaction
from tests.samples import medication_request, message_body


def post(base, token, body, key=None, **kw):
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{base}/api/v1/messages", json=body, headers=headers, timeout=60, **kw)


def test_fifty_concurrent_posts_with_one_key_make_one_message_and_one_delivery(
    live_server, users, fhir_connection, sessions, run_worker, sim_control
):
    body = message_body("mercy-epic", medication_request(7))
    barrier = threading.Barrier(50)
    results = []

    def hit():
        barrier.wait()
        results.append(post(live_server, users["svc_token"], body, "same-key-50"))

    threads = [threading.Thread(target=hit) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    statuses = [r.status_code for r in results]
    assert set(statuses) <= {202, 409}, statuses
    accepted = [r.json()["id"] for r in results if r.status_code == 202]
    assert accepted and len(set(accepted)) == 1
    for r in results:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_in_progress"
    with transaction(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Message)) == 1

    run_worker()
    tenant = fhir_connection.tenant
    assert sim_control.deliveries(tenant) == {"urn:recon:idempotency:svc|same-key-50": 1}
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "same-key-50") == 1


def test_same_key_same_body_returns_the_original_response(live_server, users, fhir_connection):
    body = message_body("mercy-epic", medication_request(8))
    first = post(live_server, users["svc_token"], body, "k-8")
    again = post(live_server, users["svc_token"], json.loads(json.dumps(body)), "k-8")
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"


def test_same_key_different_body_is_422(live_server, users, fhir_connection):
    post(live_server, users["svc_token"], message_body("mercy-epic", medication_request(9)), "k-9")
    r = post(live_server, users["svc_token"], message_body("mercy-epic", medication_request(10)), "k-9")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"


def test_missing_key_is_400(live_server, users, fhir_connection):
    r = post(live_server, users["svc_token"], message_body("mercy-epic", medication_request(11)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_required"


def test_keys_are_unique_per_client(live_server, users, fhir_connection, sessions):
    from app.services.users import create_token, create_user

    with transaction(sessions) as s:
        other = create_token(s, create_user(s, "engine", "service", None))
    a = post(live_server, users["svc_token"], message_body("mercy-epic", medication_request(12)), "shared")
    b = post(live_server, other, message_body("mercy-epic", medication_request(13)), "shared")
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]


def test_body_that_is_not_json_is_a_400_json_error(live_server, users, fhir_connection):
    r = httpx.post(
        f"{live_server}/api/v1/messages",
        content=b"\xff\xfe not json",
        headers={
            "Authorization": f"Bearer {users['svc_token']}",
            "Idempotency-Key": "k-x",
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_unknown_connection_is_a_404_json_error(live_server, users, fhir_connection):
    r = post(live_server, users["svc_token"], message_body("nope", medication_request(1)), "k-y")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_connection"


def test_unreadable_payload_is_stored_byte_for_byte_as_data_shape(
    live_server, users, fhir_connection, sessions
):
    raw = '{"resourceType": "MedicationRequest", "note": [{"text": "Nuñez – dose"}]}'.encode("cp1252")
    body = {
        "connection": "mercy-epic",
        "message_type": "MedicationRequest",
        "content_type": "application/fhir+json",
        "payload_base64": base64.b64encode(raw).decode(),
    }
    r = post(live_server, users["svc_token"], body, "legacy-1")
    assert r.status_code == 202
    assert r.json()["status"] == "exception" and r.json()["category"] == "data_shape"
    with transaction(sessions) as s:
        stored = s.scalar(sa.select(PayloadVersion).join(Message).where(Message.id == r.json()["id"]))
        assert stored.raw == raw


def test_truncated_json_payload_is_a_data_shape_exception_and_never_sent(
    live_server, users, fhir_connection, run_worker, sim_control
):
    body = {
        "connection": "mercy-epic",
        "message_type": "MedicationRequest",
        "content_type": "application/fhir+json",
        "payload": '{"resourceType": "MedicationRequest", "stat',
    }
    r = post(live_server, users["svc_token"], body, "trunc-1")
    assert r.status_code == 202 and r.json()["category"] == "data_shape"
    run_worker()
    assert sim_control.deliveries(fhir_connection.tenant) == {}


def test_invalid_fhir_resource_becomes_data_shape_without_being_sent(
    live_server, users, fhir_connection, run_worker, sim_control, make_tokens
):
    resource = medication_request(14)
    resource["status"] = 12  # not a code
    r = post(live_server, users["svc_token"], message_body("mercy-epic", resource), "bad-shape-1")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    run_worker()
    m = httpx.get(
        f"{live_server}/api/v1/messages/{r.json()['id']}",
        headers={"Authorization": f"Bearer {users['svc_token']}"},
    ).json()
    assert m["attempts"][0]["category"] == "data_shape"
    assert sim_control.deliveries(fhir_connection.tenant) == {}
