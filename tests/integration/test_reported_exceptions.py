"""SPEC 9.3 POST /api/v1/exceptions: an interface engine hands a message that failed on its side to
the reviewers — stored byte-for-byte, idempotent on its key, categorized from the payload and the
engine's error text, and replayed later through our own adapter like any other exception."""

from __future__ import annotations

import base64
import hashlib
import json

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.db.models import ExceptionItem, Message, PayloadVersion, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.factories import HL7_ORU
from tests.samples import medication_request

HL7 = "x-application/hl7-v2+er7"
FHIR = "application/fhir+json"


def report(client, token: str, key: str | None, **body):
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/api/v1/exceptions", json=body, headers=headers)


def hl7_report(**overrides) -> dict:
    body = {
        "connection": "mercy-epic",
        "message_type": "ORU^R01",
        "content_type": HL7,
        "payload": HL7_ORU,
        "error": "MSA|AE|CTRL0001\rERR||PID^1^7|101^Required field missing^HL70357|E||||PID-7 is required",
    }
    return {**body, **overrides}


def test_reported_hl7_failure_enters_the_rejected_queue_with_its_bytes(
    client, users, fhir_connection, sessions
):
    r = report(client, users["svc_token"], "engine-1", **hl7_report())
    assert r.status_code == 202, r.get_data(as_text=True)
    assert set(r.json) == {"id", "exception_id", "category"}
    assert r.json["category"] == "ehr_rejected"
    with transaction(sessions, read_only=True) as s:
        item = s.get(ExceptionItem, r.json["exception_id"])
        message = s.get(Message, r.json["id"])
        payload = s.get(PayloadVersion, message.current_payload_id)
        assert (item.state, item.message_id, message.status) == ("open", message.id, "exception")
        assert payload.raw == HL7_ORU.encode() and payload.sha256 == hashlib.sha256(payload.raw).hexdigest()
        assert "reported by svc" in item.detail and "PID-7 is required" in item.detail
        assert not item.needs_not_applied_confirmation  # an AE means the EHR did not apply it


def test_same_key_same_report_is_the_original_response_and_a_changed_one_is_422(
    client, users, fhir_connection, sessions
):
    first = report(client, users["svc_token"], "engine-2", **hl7_report())
    again = report(client, users["svc_token"], "engine-2", **hl7_report())
    assert again.status_code == 202 and again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    changed = report(client, users["svc_token"], "engine-2", **hl7_report(error="MSA|AR|CTRL0001"))
    assert changed.status_code == 422 and changed.json["error"]["code"] == "idempotency_key_reused"
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(ExceptionItem)) == 1


def test_unreadable_bytes_are_kept_as_data_shape(client, users, fhir_connection, sessions):
    raw = b'{"resourceType": "MedicationRequest", "note": "M\xfcller \xff\xfe"}'
    r = report(
        client,
        users["svc_token"],
        "engine-3",
        connection="mercy-epic",
        message_type="MedicationRequest",
        content_type=FHIR,
        payload_base64=base64.b64encode(raw).decode(),
        error="HTTP 400 from the EHR",
    )
    assert r.status_code == 202 and r.json["category"] == "data_shape"
    with transaction(sessions, read_only=True) as s:
        message = s.get(Message, r.json["id"])
        assert s.get(PayloadVersion, message.current_payload_id).raw == raw


def test_bad_reports_get_clear_4xx_json_errors(client, users, fhir_connection):
    token = users["svc_token"]
    assert report(client, token, None, **hl7_report()).status_code == 400
    missing = report(client, token, "engine-4", **{k: v for k, v in hl7_report().items() if k != "error"})
    assert missing.status_code == 422 and missing.json["error"]["code"] == "invalid_body"
    blank = report(client, token, "engine-5", **hl7_report(error="  "))
    assert blank.status_code == 422
    unknown = report(client, token, "engine-6", **hl7_report(connection="nowhere"))
    assert unknown.status_code == 404 and unknown.json["error"]["code"] == "unknown_connection"
    both = report(client, token, "engine-7", **hl7_report(payload_base64="AA=="))
    assert both.status_code == 422


def test_only_service_accounts_report_exceptions(client, users, fhir_connection, make_tokens):
    tokens = make_tokens("rita")
    assert report(client, tokens["rita"], "engine-8", **hl7_report()).status_code == 403


def test_reported_timeout_is_reconciled_and_replayed_through_our_adapter(
    client, users, fhir_connection, sessions, sim_control, run_worker
):
    tenant = fhir_connection.tenant
    resource = medication_request(41)
    r = report(
        client,
        users["svc_token"],
        "engine-9",
        connection="mercy-epic",
        message_type="MedicationRequest",
        content_type=FHIR,
        payload=json.dumps(resource),
        error="Read timed out after 30000 ms waiting for the EHR",
    )
    assert r.status_code == 202 and r.json["category"] == "unknown_outcome"
    exc_id = r.json["exception_id"]
    run_worker()
    assert sim_control.deliveries(tenant) == {}  # a report is never sent by itself
    with transaction(sessions) as s:
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="reconcile"))
    with transaction(sessions) as s:
        decide(
            s, exc_id, s.get(User, users["lena"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    run_worker()  # the replay searches by identifier first (not there), then sends it once
    with transaction(sessions, read_only=True) as s:
        assert s.get(ExceptionItem, exc_id).state == "resolved"
    assert sim_control.deliveries(tenant, what="applied") == {"urn:recon:idempotency:svc|engine-9": 1}


def test_openapi_describes_the_report(client):
    spec = client.get("/api/v1/openapi.json").json
    post = spec["paths"]["/exceptions"]["post"]
    assert "202" in post["responses"] and "Idempotency-Key" in json.dumps(post["parameters"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=400),
    error=st.one_of(st.text(max_size=200), st.just("timed out\x00 waiting"), st.just("bad \ud800 text")),
    content_type=st.sampled_from([HL7, FHIR]),
)
def test_any_bytes_and_any_error_text_are_stored_never_a_5xx(
    client, users, fhir_connection, sessions, raw, error, content_type
):
    """Count in = count stored: whatever an engine sends, it is kept byte-for-byte in a queue."""
    key = (
        "fuzz-"
        + hashlib.sha256(raw + error.encode("utf-8", "surrogatepass") + content_type.encode()).hexdigest()[
            :32
        ]
    )
    r = report(
        client,
        users["svc_token"],
        key,
        connection="mercy-epic",
        message_type="ORU^R01" if content_type == HL7 else "MedicationRequest",
        content_type=content_type,
        payload_base64=base64.b64encode(raw).decode(),
        error=error,
    )
    if not error.strip():
        assert r.status_code == 422  # the engine's error text is required
        return
    assert r.status_code == 202, r.get_data(as_text=True)
    with transaction(sessions, read_only=True) as s:
        message = s.get(Message, r.json["id"])
        assert s.get(PayloadVersion, message.current_payload_id).raw == raw
        assert s.get(ExceptionItem, r.json["exception_id"]).state == "open"


def test_a_lone_surrogate_in_a_submitted_payload_is_stored_as_data_shape_not_a_500(
    client, users, fhir_connection, sessions
):
    body = (
        '{"connection": "mercy-epic", "message_type": "MedicationRequest", '
        '"content_type": "application/fhir+json", "payload": "{\\"resourceType\\": \\"\\ud800\\"}"}'
    )
    headers = {
        "Authorization": f"Bearer {users['svc_token']}",
        "Idempotency-Key": "surrogate-1",
        "Content-Type": "application/json",
    }
    r = client.post("/api/v1/messages", data=body, headers=headers)
    assert r.status_code == 202 and r.json["category"] == "data_shape", r.get_data(as_text=True)
    bad_type = body.replace('"MedicationRequest"', '"\\udc00"')
    r = client.post("/api/v1/messages", data=bad_type, headers={**headers, "Idempotency-Key": "surrogate-2"})
    assert r.status_code == 422 and r.json["error"]["code"] == "invalid_body"


def test_migration_0004_backfills_identifiers_of_existing_messages(
    client, users, fhir_connection, sessions, database_url
):
    from alembic import command

    from app.db.migrate import alembic_config, upgrade
    from app.db.models import MessageIdentifier
    from app.db.session import get_engine

    r = report(client, users["svc_token"], "backfill-1", **hl7_report())
    cfg = alembic_config(database_url)
    with get_engine(database_url).connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
        conn.commit()
    upgrade(database_url)
    with transaction(sessions, read_only=True) as s:
        found = s.execute(
            sa.select(MessageIdentifier.kind, MessageIdentifier.value).where(
                MessageIdentifier.message_id == r.json["id"]
            )
        ).all()
    assert ("patient_id", "123456") in found and ("placer_order", "ORD1") in found
