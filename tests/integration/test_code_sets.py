"""Issue 5 at the intake boundary: a diagnosis coded in the other ICD revision than the connection's
EHR expects is a `code_set` exception before anything is sent (HL7 v2 over MLLP and FHIR alike),
`--diagnosis-codes any` lets it through to the EHR, and an HL7 v2 message that cannot be used is a
`data_shape` exception naming segment, field and byte offset — its bytes kept, nothing sent."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import sqlalchemy as sa

from app.db.models import Attempt, Customer, DriftCount, ExceptionItem, Message, PayloadVersion
from app.db.session import transaction
from app.services import connections
from tests.samples_fhir import ICD9, ICD10, LOINC

HL7 = "x-application/hl7-v2+er7"
FHIR = "application/fhir+json"


def adt_a08(tenant: str, diagnosis: str = "250.00^Diabetes mellitus without complication^I9C") -> str:
    return (
        f"MSH|^~\\&|RECON|MERCY|EHR|{tenant.upper()}|20261202101500||ADT^A08|ORIGINAL|P|2.5.1\r"
        "EVN|A08|20261202101500\r"
        "PID|1||MRN-00042^^^MERCY^MR||NUÑEZ^MARÍA||19800101|F\r"
        "PV1|1|I|4W^401^A\r"
        f"DG1|1||{diagnosis}||20261202|A"
    )


def condition(system: str = ICD9, code: str = "250.00") -> dict:
    return {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "code": {"coding": [{"system": system, "code": code, "display": "Diabetes mellitus"}]},
        "subject": {"reference": "Patient/pat-1001"},
    }


def service_request(system: str = ICD9, code: str = "401.9") -> dict:
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {
            "coding": [{"system": LOINC, "code": "24323-8", "display": "Comprehensive metabolic panel"}]
        },
        "subject": {"reference": "Patient/pat-1001"},
        "reasonCode": [{"coding": [{"system": system, "code": code, "display": "Hypertension NOS"}]}],
    }


@pytest.fixture
def connection(sessions, sim):
    """connection(name, protocol, diagnosis_codes) -> the simulator tenant it points at."""

    def make(name: str, protocol: str, diagnosis_codes: str = "icd-10") -> str:
        tenant = f"c{uuid.uuid4().hex[:10]}"
        endpoint = f"127.0.0.1:{sim.mllp_port}" if protocol == "hl7v2-mllp" else sim.tenant_url(tenant)
        with transaction(sessions) as s:
            if not s.scalar(sa.select(Customer).where(Customer.name == "Mercy Health")):
                connections.add_customer(s, "Mercy Health")
            connections.add_connection(
                s,
                name,
                customer="Mercy Health",
                protocol=protocol,
                endpoint=endpoint,
                diagnosis_code_system=diagnosis_codes,
                connect_timeout=2.0,
                read_timeout=3.0,
                retry_backoff_seconds=0.0,
            )
        return tenant

    return make


def post(client, users, path: str, key: str, **body):
    r = client.post(
        f"/api/v1/{path}",
        json=body,
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json


def stored(sessions, message_id: str):
    with transaction(sessions, read_only=True) as s:
        message = s.get(Message, message_id)
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
        attempts = s.scalar(
            sa.select(sa.func.count()).select_from(Attempt).where(Attempt.message_id == message_id)
        )
        raw = s.get(PayloadVersion, message.current_payload_id).raw
        drift = dict(
            s.execute(
                sa.select(DriftCount.kind, DriftCount.count).where(
                    DriftCount.connection_id == message.connection_id
                )
            ).all()
        )
        return message, item, attempts, raw, drift


def test_icd9_in_dg1_to_an_icd10_mllp_connection_is_code_set_and_never_sent(
    client, users, sessions, sim_control, connection, run_worker
):
    tenant = connection("mercy-adt", "hl7v2-mllp")
    raw = adt_a08(tenant).encode("cp1252")
    accepted = post(
        client,
        users,
        "messages",
        "adt-icd9",
        connection="mercy-adt",
        message_type="ADT^A08",
        content_type=HL7,
        payload_base64=base64.b64encode(raw).decode(),
    )
    assert accepted["category"] == "code_set"
    run_worker()
    message, item, attempts, kept, drift = stored(sessions, accepted["id"])
    assert (message.status, item.state, attempts) == ("exception", "open", 0)
    offset = raw.index(b"250.00")
    assert item.detail == (
        f"DG1-3 (Diagnosis Code) at byte offset {offset} is ICD-9-CM (I9C) 250.00; this connection expects ICD-10"
    )
    assert kept == raw  # byte for byte, cp1252 and all
    assert drift == {"decode_fallback": 1, "unknown_code_system": 1}
    applied = sim_control.http.get(f"/_sim/tenants/{tenant}/hl7").json()["applied"]
    assert applied == {}


@pytest.mark.parametrize(
    ("resource", "where"),
    [
        (condition(), "Condition.code.coding[0] is ICD-9-CM 250.00"),
        (service_request(), "ServiceRequest.reasonCode[0].coding[0] is ICD-9-CM 401.9"),
    ],
)
def test_icd9_in_a_fhir_resource_to_an_icd10_connection_is_code_set_naming_the_path(
    resource, where, client, users, sessions, sim_control, connection, run_worker
):
    tenant = connection("mercy-fhir", "fhir-r4")
    accepted = post(
        client,
        users,
        "messages",
        f"fhir-icd9-{resource['resourceType']}",
        connection="mercy-fhir",
        message_type=resource["resourceType"],
        content_type=FHIR,
        payload=json.dumps(resource),
    )
    assert accepted["category"] == "code_set"
    run_worker()
    _, item, attempts, _, drift = stored(sessions, accepted["id"])
    assert item.detail == f"{where}; this connection expects ICD-10" and attempts == 0
    assert drift == {"unknown_code_system": 1}
    assert sim_control.requests(tenant)["by_identifier"] == {}


def test_an_icd9_connection_refuses_icd10_and_accepts_icd9(client, users, connection):
    connection("legacy-fhir", "fhir-r4", diagnosis_codes="icd-9")
    body = {"connection": "legacy-fhir", "message_type": "Condition", "content_type": FHIR}
    refused = post(
        client, users, "messages", "legacy-1", **body, payload=json.dumps(condition(ICD10, "E11.9"))
    )
    assert refused["category"] == "code_set"
    # ICD-9 goes through to routing: Condition is not a type the simulator takes, but that is the EHR's say.
    accepted = post(client, users, "messages", "legacy-2", **body, payload=json.dumps(condition()))
    assert "category" not in accepted and accepted["status"] == "queued"


def test_diagnosis_codes_any_lets_icd9_through_to_the_ehr(
    client, users, sessions, sim_control, connection, run_worker
):
    fhir_tenant = connection("mixed-fhir", "fhir-r4", diagnosis_codes="any")
    mllp_tenant = connection("mixed-adt", "hl7v2-mllp", diagnosis_codes="any")
    fhir = post(
        client,
        users,
        "messages",
        "any-fhir",
        connection="mixed-fhir",
        message_type="ServiceRequest",
        content_type=FHIR,
        payload=json.dumps(service_request()),
    )
    hl7 = post(
        client,
        users,
        "messages",
        "any-hl7",
        connection="mixed-adt",
        message_type="ADT^A08",
        content_type=HL7,
        payload=adt_a08(mllp_tenant),
    )
    assert fhir["status"] == hl7["status"] == "queued"
    run_worker()
    for accepted in (fhir, hl7):
        message, item, attempts, _, drift = stored(sessions, accepted["id"])
        assert (message.status, item, attempts) == ("delivered", None, 1)
        assert "unknown_code_system" not in drift  # ICD-9 is what this EHR reads
    assert sim_control.deliveries(fhir_tenant, what="applied") == {"urn:recon:idempotency:svc|any-fhir": 1}
    applied = sim_control.http.get(f"/_sim/tenants/{mllp_tenant}/hl7").json()["applied"]
    assert list(applied.values()) == [1]


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        (lambda m: m.replace("PID|", "P1D|"), "segment 3 'P1D' is not a segment name at byte offset {PID}"),
        (lambda m: m.replace("|ADT^A08|", "||"), "MSH-9 (Message Type) is empty at byte offset {MSH9}"),
        (lambda m: m.split("\rPID")[0], "message is truncated: no PID segment after MSH for ADT^A08"),
        (
            lambda m: m.replace("|ADT^A08|", "|ORU^R01|"),
            "MSH-9 (Message Type) 'ORU^R01' at byte offset {MSH9}",
        ),
    ],
)
def test_an_unusable_hl7_message_is_data_shape_naming_segment_field_and_offset(
    broken, problem, client, users, sessions, connection
):
    tenant = connection("mercy-adt", "hl7v2-mllp")
    raw = broken(adt_a08(tenant, "E11.9^Type 2 diabetes^I10C")).encode("utf-8")
    accepted = post(
        client,
        users,
        "messages",
        "broken",
        connection="mercy-adt",
        message_type="ADT^A08",
        content_type=HL7,
        payload_base64=base64.b64encode(raw).decode(),
    )
    assert accepted["category"] == "data_shape"
    _, item, attempts, kept, _ = stored(sessions, accepted["id"])
    expected = problem.format(
        PID=raw.find(b"P1D|"), MSH9=raw.index(b"20261202101500||") + len(b"20261202101500||")
    )
    assert expected in item.detail and attempts == 0 and kept == raw


def test_a_reported_rejection_with_icd9_is_code_set_and_a_reported_timeout_stays_uncertain(
    client, users, sessions, connection
):
    tenant = connection("mercy-adt", "hl7v2-mllp")
    body = {
        "connection": "mercy-adt",
        "message_type": "ADT^A08",
        "content_type": HL7,
        "payload": adt_a08(tenant),
    }
    rejected = post(
        client,
        users,
        "exceptions",
        "engine-ae",
        **body,
        error="MSA|AE|ORIGINAL\rERR||DG1^1^3|103^Table value not found^HL70357|E",
    )
    assert rejected["category"] == "code_set"
    timed_out = post(client, users, "exceptions", "engine-timeout", **body, error="no ACK within 30 s")
    assert timed_out["category"] == "unknown_outcome"  # may have been applied: that stands
    with transaction(sessions, read_only=True) as s:
        item = s.get(ExceptionItem, timed_out["exception_id"])
        assert item.needs_not_applied_confirmation
        assert item.detail.startswith(
            "reported by svc: no ACK within 30 s — code set: DG1-3 (Diagnosis Code)"
        )


def test_a_correction_must_fix_the_code_set_and_one_that_does_goes_through(
    client, users, sessions, connection
):
    from app.domain.errors import Invalid
    from app.services.exceptions import DecisionInput, decide

    connection("mercy-fhir", "fhir-r4")
    accepted = post(
        client,
        users,
        "messages",
        "cond-correct",
        connection="mercy-fhir",
        message_type="Condition",
        content_type=FHIR,
        payload=json.dumps(condition()),
    )
    assert accepted["category"] == "code_set"
    still_icd9 = json.dumps({**condition(), "note": [{"text": "recoded?"}]})
    with transaction(sessions) as s, pytest.raises(Invalid, match="ICD-9-CM 250.00"):
        decide(
            s,
            accepted["exception_id"],
            s.merge(users["rita"]),
            DecisionInput("resubmit_corrected", reason="add a note", payload=still_icd9),
        )
    with transaction(sessions) as s:
        decision = decide(
            s,
            accepted["exception_id"],
            s.merge(users["rita"]),
            DecisionInput(
                "resubmit_corrected",
                reason="recoded to ICD-10",
                payload=json.dumps(condition(ICD10, "E11.9")),
            ),
        )
        assert decision.action == "resubmit_corrected"
