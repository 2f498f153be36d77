"""SPEC 2: intake never drops data — decoding never raises and always keeps the bytes."""

import json

from hypothesis import given
from hypothesis import strategies as st

from app.domain.payloads import FHIR_JSON, HL7_ER7, decode_payload, patient_reference


@given(st.binary(max_size=2000), st.sampled_from([FHIR_JSON, HL7_ER7]))
def test_decode_never_raises_and_keeps_the_exact_bytes(raw, content_type):
    decoded = decode_payload(raw, content_type, "MedicationRequest")
    assert decoded.raw == raw
    assert isinstance(decoded.text, str)
    assert len(decoded.sha256) == 64


def test_cp1252_fhir_is_flagged_not_lost():
    raw = json.dumps({"resourceType": "Patient", "name": [{"family": "Nuñez"}]}, ensure_ascii=False).encode(
        "cp1252"
    )
    decoded = decode_payload(raw, FHIR_JSON, "Patient")
    assert decoded.problem and decoded.problem_kind == "decode"
    assert decoded.raw == raw


def test_truncated_json_is_a_parse_problem():
    decoded = decode_payload(
        b'{"resourceType": "MedicationRequest", "status": "act', FHIR_JSON, "MedicationRequest"
    )
    assert decoded.problem_kind == "parse"


def test_resource_type_must_match_message_type():
    decoded = decode_payload(b'{"resourceType": "Observation"}', FHIR_JSON, "MedicationRequest")
    assert decoded.problem_kind == "shape"


def test_valid_fhir_has_no_problem_and_patient_reference():
    body = {"resourceType": "MedicationRequest", "subject": {"reference": "Patient/abc123"}}
    decoded = decode_payload(json.dumps(body).encode(), FHIR_JSON, "MedicationRequest")
    assert decoded.problem is None
    assert patient_reference(FHIR_JSON, decoded.text) == "Patient/abc123"
