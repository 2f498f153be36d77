"""Issue 5: the patient and order identifiers a message carries, for search."""

import json

from hypothesis import given
from hypothesis import strategies as st

from app.domain.identifiers import extract_identifiers, search_values
from app.domain.payloads import FHIR_JSON, HL7_ER7

ORM = (
    "MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||ORM^O01|CTRL0002|P|2.5.1\r"
    "PID|1||MRN-00042^^^MERCY^MR~998877^^^SSA^SS||DOE^JANE||19800101|F\r"
    "ORC|NW|PLC-77^RECON|FIL-88^EHR\r"
    "OBR|1|PLC-77^RECON|FIL-88^EHR|718-7^Hemoglobin^LN"
)


def test_hl7_patient_ids_every_repetition_and_order_numbers():
    assert extract_identifiers(HL7_ER7, ORM) == [
        ("patient_id", "MRN-00042"),
        ("patient_id", "998877"),
        ("placer_order", "PLC-77"),
        ("filler_order", "FIL-88"),
    ]


def test_hl7_with_other_separators_and_newlines():
    text = ORM.replace("|", "#").replace("^", "@").replace("\r", "\n")
    text = text.replace("MSH#@~\\&", "MSH#@~\\&")
    assert ("patient_id", "MRN-00042") in extract_identifiers(HL7_ER7, text)


def test_fhir_identifiers_subject_and_patient_id():
    order = {
        "resourceType": "MedicationRequest",
        "identifier": [{"system": "urn:oid:1.2", "value": "ORD-1"}],
        "subject": {"reference": "Patient/123456"},
    }
    assert extract_identifiers(FHIR_JSON, json.dumps(order)) == [
        ("identifier", "ORD-1"),
        ("patient", "Patient/123456"),
        ("patient", "123456"),
    ]
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"value": "MRN-9"}]}
    assert ("identifier", "MRN-9") in extract_identifiers(FHIR_JSON, json.dumps(patient))


def test_a_typed_reference_also_searches_its_id():
    assert search_values(" Patient/123456 ") == ["Patient/123456", "123456"]
    assert search_values("MRN-00042") == ["MRN-00042"]


@given(st.text(max_size=500), st.sampled_from([FHIR_JSON, HL7_ER7]))
def test_never_raises_and_values_fit_the_column(text, content_type):
    for kind, value in extract_identifiers(content_type, text):
        assert 0 < len(value) <= 200 and "\x00" not in value and kind
