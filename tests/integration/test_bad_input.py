"""Bad input gets a clear 4xx with a JSON error or a form message — never a 500 — and intake
loses nothing."""

import sqlalchemy as sa

from app.db.models import Message, PayloadVersion
from app.db.session import transaction
from tests.factories import make_exception


def _submit_payload(client, users, payload: str, key: str):
    body = {
        "connection": "mercy-epic",
        "message_type": "MedicationRequest",
        "content_type": "application/fhir+json",
        "payload": payload,
    }
    headers = {"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key}
    return client.post("/api/v1/messages", json=body, headers=headers)


def test_deeply_nested_json_payload_is_stored_as_data_shape(client, users, fhir_connection, sessions):
    payload = "[" * 50_000 + "]" * 50_000
    r = _submit_payload(client, users, payload, "deep-1")
    assert r.status_code == 202 and r.json["category"] == "data_shape"


def test_nul_in_a_payload_is_kept_byte_for_byte(client, users, fhir_connection, sessions):
    payload = '{"resourceType": "MedicationRequest", "note": [{"text": "a\\u0000b"}]}'.replace(
        "\\u0000", "\x00"
    )
    r = _submit_payload(client, users, payload, "nul-1")
    assert r.status_code == 202 and r.json["category"] == "data_shape"
    with transaction(sessions) as s:
        stored = s.scalar(sa.select(PayloadVersion).join(Message).where(Message.id == r.json["id"]))
        assert stored.raw == payload.encode()


def test_nul_in_other_fields_is_a_400(client, users, fhir_connection):
    r = client.post(
        "/api/v1/messages",
        json={
            "connection": "mercy\x00",
            "message_type": "X",
            "content_type": "application/fhir+json",
            "payload": "{}",
        },
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "nul-2"},
    )
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_characters"


def test_wrong_types_are_422(client, users, fhir_connection):
    for body in (
        {"connection": 5},
        {"connection": "mercy-epic", "message_type": ["x"], "content_type": "y"},
        {
            "connection": "mercy-epic",
            "message_type": "MedicationRequest",
            "content_type": "application/fhir+json",
            "payload": 7,
        },
        {
            "connection": "mercy-epic",
            "message_type": "MedicationRequest",
            "content_type": "application/fhir+json",
            "payload_base64": "***",
        },
    ):
        r = client.post(
            "/api/v1/messages",
            json=body,
            headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "types"},
        )
        assert r.status_code == 422, (body, r.json)
        assert r.json["error"]["code"]


def test_huge_ids_and_cursors_are_4xx(client, users, sessions, make_tokens):
    tokens = make_tokens("rita", "audrey")
    rita = {"Authorization": f"Bearer {tokens['rita']}"}
    assert client.get(f"/api/v1/exceptions/{2**70}", headers=rita).status_code == 404
    assert client.get("/api/v1/exceptions?cursor=garbage", headers=rita).status_code == 422
    assert client.get("/api/v1/exceptions?limit=abc", headers=rita).status_code == 422
    auditor = {"Authorization": f"Bearer {tokens['audrey']}"}
    assert client.get(f"/api/v1/audit?cursor={2**70}", headers=auditor).status_code == 422
    assert client.get("/api/v1/audit?since=0001-01-01T00:00:00%2B01:00", headers=auditor).status_code == 422
    r = client.post(
        f"/api/v1/exceptions/{2**70}/decisions", json={"action": "comment", "reason": "x"}, headers=rita
    )
    assert r.status_code == 404


def test_decision_bodies_are_validated(client, users, sessions, make_tokens):
    exc_id = make_exception(sessions, users["svc"], key="bad-dec")
    rita = {"Authorization": f"Bearer {make_tokens('rita')['rita']}"}
    url = f"/api/v1/exceptions/{exc_id}/decisions"
    assert client.post(url, data="nope", headers=rita).status_code == 400
    assert client.post(url, json={"action": "launch"}, headers=rita).status_code == 422
    assert (
        client.post(url, json={"action": "discard", "reason_code": "bogus"}, headers=rita).status_code == 422
    )
    assert client.post(url, json={"action": "comment", "reason": 5}, headers=rita).status_code == 422
    assert (
        client.post(
            url, json={"action": "resubmit_corrected", "reason": "x", "payload": "[" * 50_000}, headers=rita
        ).status_code
        == 422
    )


def test_console_rejects_huge_ids_and_odd_search(client, auth, users, sessions):
    make_exception(sessions, users["svc"], key="console-odd")
    auth.login("rita")
    assert client.get(f"/exceptions/{2**70}").status_code == 404
    assert client.get("/queues/all?q=%23%C2%B2").status_code == 200
    assert client.get("/queues/all?cursor=%%%").status_code == 422
    auth.logout()
    auth.login("audrey")
    r = client.get("/audit?since=not-a-date")
    assert r.status_code == 422 and "not a date" in r.get_data(as_text=True)
    assert client.get("/audit?since=0001-01-01T00:00:00%2B01:00").status_code == 422


def test_login_redirect_stays_on_this_site(client, users):
    from tests.conftest import PASSWORD, csrf_token

    token = csrf_token(client, "/login")
    for target in ("//evil.example/x", "/\\evil.example", "https://evil.example/", "/%5Cevil"):
        r = client.post(
            f"/login?next={target}", data={"username": "rita", "password": PASSWORD, "csrf_token": token}
        )
        assert r.status_code == 302
        assert "evil" not in r.headers["Location"], target
