"""Bad input gets a clear 4xx with a JSON error or a form message — never a 500 — and intake
loses nothing."""

import json
import uuid

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- issue 7: the three bodies that used to answer 500, and the ids past the column's range -------


def _stored_raw(sessions, message_id: str) -> bytes:
    with transaction(sessions) as s:
        return s.scalar(sa.select(PayloadVersion.raw).where(PayloadVersion.message_id == message_id))


def test_a_patient_id_longer_than_the_column_is_stored_not_a_500(client, users, fhir_connection, sessions):
    long_id = "p" * 300
    for n, resource in enumerate(
        (
            {"resourceType": "Patient", "id": long_id, "name": [{"family": "Lee"}]},
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "subject": {"reference": f"Patient/{long_id}"},
            },
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "identifier": [{"system": "urn:x:" + "s" * 300, "value": "v" * 300}],
            },
        )
    ):
        payload = json.dumps(resource)
        r = _submit_payload(client, users, payload, f"long-{n}")
        assert r.status_code == 202, r.get_data(as_text=True)
        assert _stored_raw(sessions, r.json["id"]) == payload.encode()


def test_a_lone_surrogate_anywhere_in_the_body_is_never_a_500(client, users, fhir_connection, sessions):
    headers = {"Authorization": f"Bearer {users['svc_token']}", "Content-Type": "application/json"}
    raw_payload = '{"resourceType": "Patient", "id": "a\\ud800b"}'
    body = (
        '{"connection": "mercy-epic", "message_type": "Patient", '
        '"content_type": "application/fhir+json", "payload": ' + json.dumps(raw_payload) + "}"
    )
    # the JSON string escape travels inside the payload text: kept, data_shape
    r = client.post("/api/v1/messages", data=body, headers={**headers, "Idempotency-Key": "sur-1"})
    assert r.status_code == 202 and r.json["category"] == "data_shape", r.get_data(as_text=True)
    # the payload string itself holds a lone surrogate: kept byte-for-byte (surrogatepass)
    body = body.replace(json.dumps(raw_payload), '"\\ud800"')
    r = client.post("/api/v1/messages", data=body, headers={**headers, "Idempotency-Key": "sur-2"})
    assert r.status_code == 202 and r.json["category"] == "data_shape", r.get_data(as_text=True)
    assert _stored_raw(sessions, r.json["id"]) == "\ud800".encode("utf-8", "surrogatepass")
    # in a field that names something: refused, 4xx
    for field in ("connection", "message_type"):
        bad = (
            '{"connection": "mercy-epic", "message_type": "Patient", "content_type": '
            '"application/fhir+json", "payload": "{}"}'
        ).replace(f'"{field}": "', f'"{field}": "\\udc80')
        r = client.post("/api/v1/messages", data=bad, headers={**headers, "Idempotency-Key": f"sur-{field}"})
        assert 400 <= r.status_code < 500, (field, r.status_code)
    r = client.post(
        "/api/v1/exceptions",
        data=body.replace("}", ', "error": "AE \\udfff"}'),
        headers={**headers, "Idempotency-Key": "sur-3"},
    )
    assert r.status_code == 202, r.get_data(as_text=True)


def test_a_body_nested_a_thousand_levels_deep_is_a_4xx(client, users, fhir_connection):
    headers = {
        "Authorization": f"Bearer {users['svc_token']}",
        "Content-Type": "application/json",
        "Idempotency-Key": "deep-body",
    }
    for depth in (1_000, 100_000):
        body = (
            '{"connection": "mercy-epic", "message_type": "Patient", "content_type": '
            '"application/fhir+json", "payload": "{}", "extra": ' + "[" * depth + "]" * depth + "}"
        )
        for url in ("/api/v1/messages", "/api/v1/exceptions", "/api/v1/exceptions/1/decisions"):
            r = client.post(url, data=body, headers=headers)
            assert 400 <= r.status_code < 500, (url, depth, r.status_code)
            assert r.json["error"]["code"]


def test_ids_past_the_id_columns_are_404_on_every_id_route(client, users, make_tokens):
    from tests.conftest import PASSWORD, csrf_token

    rita = {"Authorization": f"Bearer {make_tokens('rita')['rita']}"}
    for huge in (2**31, 2**53, 2**63 - 1):
        assert client.get(f"/api/v1/exceptions/{huge}", headers=rita).status_code == 404
        r = client.post(
            f"/api/v1/exceptions/{huge}/decisions", json={"action": "comment", "reason": "x"}, headers=rita
        )
        assert r.status_code == 404
    auditor = {"Authorization": f"Bearer {make_tokens('audrey')['audrey']}"}
    for cursor in (2**31, 2**63 - 1, 2**63, -1):
        r = client.get(f"/api/v1/audit?cursor={cursor}", headers=auditor)
        assert r.status_code in (200, 422), (cursor, r.status_code)
    # every console route with an integer id, for an admin (who passes every access rule)
    token = csrf_token(client, "/login")
    client.post("/login", data={"username": "adam", "password": PASSWORD, "csrf_token": token})
    app = client.application
    for rule in app.url_map.iter_rules():
        if "int" not in str(rule) or rule.rule.startswith("/api/"):
            continue
        url = rule.rule
        for arg in rule.arguments:
            url = url.replace(f"<int:{arg}>", str(2**31))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            r = client.open(url, method=method, data={"csrf_token": csrf_token(client, "/")})
            assert r.status_code == 404, (method, url, r.status_code)


def test_405_names_the_allowed_methods(client):
    r = client.delete("/login")
    assert r.status_code == 405
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    r = client.put("/api/v1/messages")
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    assert r.json["error"]["code"] == "method_not_allowed"


def test_bearer_scheme_is_case_insensitive(client, users):
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        r = client.get("/api/v1/exceptions", headers={"Authorization": f"{scheme} {users['svc_token']}"})
        assert r.status_code == 403, scheme  # authenticated (a service account may not list)
    assert (
        client.get("/api/v1/exceptions", headers={"Authorization": f"Basic {users['svc_token']}"}).status_code
        == 401
    )
    assert client.get("/api/v1/exceptions", headers={"Authorization": "Bearer"}).status_code == 401


# Any text at all, lone surrogates and NUL included (a JSON body carries them as \u escapes).
_ANY_TEXT = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)
# Values that have broken intake before, mixed with anything at all.
_TRICKY = st.sampled_from(["p" * 250, "Patient/" + "9" * 200, "a\ud800b", "x\x00y", "\udfff"]) | _ANY_TEXT
_FHIR_KEYS = st.sampled_from(
    ["resourceType", "id", "subject", "patient", "reference", "identifier", "system", "value"]
)
_FHIR_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_FHIR_KEYS, children, max_size=4),
    max_leaves=12,
)
_RESOURCE = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "MedicationRequest", "Observation"]), "id": _TRICKY},
    optional={
        "subject": st.fixed_dictionaries({"reference": _TRICKY}),
        "identifier": st.lists(st.fixed_dictionaries({"system": _TRICKY, "value": _TRICKY}), max_size=2),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=_RESOURCE.map(json.dumps) | _FHIR_LIKE.map(json.dumps) | _ANY_TEXT,
    message_type=st.sampled_from(["Patient", "MedicationRequest", "ADT^A08"]) | _ANY_TEXT,
    content_type=st.sampled_from(["application/fhir+json", "x-application/hl7-v2+er7"]) | _ANY_TEXT,
    extra=_FHIR_LIKE,
    report=st.booleans(),
)
def test_intake_never_answers_500_for_any_body(
    client, users, fhir_connection, payload, message_type, content_type, extra, report
):
    body = {
        "connection": "mercy-epic",
        "message_type": message_type,
        "content_type": content_type,
        "payload": payload,
        "extra": extra,
    }
    if report:
        body["error"] = payload[:100] or "AE"
    r = client.post(
        "/api/v1/exceptions" if report else "/api/v1/messages",
        json=body,
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code < 500, r.get_data(as_text=True)
    if r.status_code == 202:
        assert r.json["id"]
