"""Issue 5 / SPEC 3.2 code_set: the other ICD revision than the connection's EHR expects is a
problem naming where it is; an unknown coding system is only observed; so is an element the
resource's FHIR model does not define."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.codesets import check_codes, hl7_system, new_fhir_elements
from app.domain.payloads import FHIR_JSON, HL7_ER7, decode_payload
from tests.samples_fhir import ICD9, ICD10, medication_request, observation, patient

MSH = "MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||ADT^A08|CTRL0001|P|2.5.1\r"
PID = "PID|1||123456^^^MRN||DOE^JANE^Q||19800101|F\r"


def adt(*segments: str) -> str:
    return MSH + PID + "\r".join(segments)


def kinds(observations) -> list[tuple[str, str]]:
    return [(o.kind, o.where) for o in observations]


# (DG1 as sent, expected by the connection, the problem's text or None)
HL7_DIAGNOSES = [
    ("DG1|1||250.00^Diabetes^I9C", "icd-10", "DG1-3 (Diagnosis Code) at character offset {at} is ICD-9-CM (I9C) 250.00; this connection expects ICD-10"),
    ("DG1|1||250.00^Diabetes^I9", "icd-10", "is ICD-9 (I9) 250.00; this connection expects ICD-10"),
    ("DG1|1||250.00^Diabetes^ICD9", "icd-10", "is ICD-9 (ICD9) 250.00"),
    ("DG1|1|I9|250.00^Diabetes", "icd-10", "is ICD-9 (I9) 250.00"),  # DG1-2, the old coding method
    ("DG1|1||E11.9^Type 2 diabetes^I10C", "icd-9", "is ICD-10-CM (I10C) E11.9; this connection expects ICD-9"),
    ("DG1|1||E11.9^Type 2 diabetes^I10", "icd-10", None),
    ("DG1|1||250.00^Diabetes^I9C", "icd-9", None),
    ("DG1|1||250.00^Diabetes^I9C", "any", None),
    ("DG1|1||E11.9^Type 2 diabetes^I10C^250.00^Diabetes^I9C", "icd-10", None),  # alternate code: fine
    ("DG1|1||250.00^Diabetes^I9C^E11.9^Type 2 diabetes^I10C", "icd-10", None),  # translated: fine
    ("DG1|1||250.00^Diabetes", "icd-10", None),  # no coding system: nothing to judge it by
]  # fmt: skip


@pytest.mark.parametrize(("dg1", "expected", "problem"), HL7_DIAGNOSES)
def test_hl7_diagnosis_codes_of_the_other_icd_revision_are_a_problem(dg1, expected, problem):
    text = adt(dg1)
    found, observations = check_codes(HL7_ER7, text, None, expected)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem.format(at=text.index("DG1|") + len("DG1|1||")) in found
        assert ("unknown_code_system", "DG1-3") in kinds(observations)


def test_any_coded_field_is_checked_and_the_rest_are_counted_in_the_problem():
    text = adt(
        "DG1|1||E11.9^Diabetes^I10C",
        "PR1|1||81.54^Total knee replacement^I9CP",
        "OBX|1|CWE|29308-4^Diagnosis^LN||401.9^Hypertension^I9C",
        "DG1|2||272.4^Hyperlipidemia^I9C",
    )
    found, observations = check_codes(HL7_ER7, text, None, "icd-10")
    assert found.startswith("PR1-3") and f"at character offset {text.index('81.54')}" in found
    assert "is ICD-9-CM procedures (I9CP) 81.54" in found and found.endswith(
        "(and 2 more coded values like it)"
    )
    assert {"PR1-3", "OBX-5", "DG1[2]-3"} <= {o.where for o in observations}


def test_a_middle_name_or_check_digit_is_not_a_coding_system():
    # XPN.3 is a middle name and CX.3 a check digit scheme: only CE/CWE fields carry systems.
    text = MSH + "PID|1||123456^4^M10^MRN||DOE^JANE^ICD9||19800101|F\r"
    assert check_codes(HL7_ER7, text, None, "icd-10") == (None, [])


def test_unknown_hl7_coding_systems_are_observed_not_refused():
    text = adt("OBX|1|CE|718-7^Hemoglobin^LN||X1^Positive^MYLAB|g/dL^^UCUM", "AL1|1||PCN^Penicillin^99ALG")
    found, observations = check_codes(HL7_ER7, text, None, "icd-10")
    assert found is None
    assert kinds(observations) == [("unknown_code_system", "OBX-5")]
    assert (
        "'MYLAB' is not one we know (OBX-5 (Observation Value) at character offset" in observations[0].detail
    )


# (a FHIR resource, expected, the problem or None)
def _condition(*codings: tuple[str, str]) -> dict:
    return {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/pat-1001"},
        "code": {"coding": [{"system": system, "code": code} for system, code in codings]},
    }


FHIR_CASES = [
    (_condition((ICD9, "250.00")), "icd-10", "Condition.code.coding[0] is ICD-9-CM 250.00; this connection expects ICD-10"),
    (_condition(("urn:oid:2.16.840.1.113883.6.103", "250.00")), "icd-10", "Condition.code.coding[0] is ICD-9-CM 250.00"),
    (_condition((ICD10, "E11.9")), "icd-9", "Condition.code.coding[0] is ICD-10-CM E11.9; this connection expects ICD-9"),
    (_condition(("http://snomed.info/sct", "44054006"), (ICD9, "250.00")), "icd-10", "Condition.code.coding[1] is ICD-9-CM"),
    (_condition((ICD9, "250.00"), (ICD10, "E11.9")), "icd-10", None),  # with its translation
    (_condition((ICD10, "E11.9")), "icd-10", None),
    (_condition((ICD9, "250.00")), "any", None),
]  # fmt: skip


@pytest.mark.parametrize(("resource", "expected", "problem"), FHIR_CASES)
def test_fhir_codings_of_the_other_icd_revision_are_a_problem_naming_the_path(resource, expected, problem):
    found, _ = check_codes(FHIR_JSON, json.dumps(resource), None, expected)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem))


def test_fhir_codings_are_found_anywhere_in_the_resource():
    request = medication_request(3)
    request["reasonCode"] = [{"coding": [{"system": ICD9, "code": "401.9", "display": "Hypertension NOS"}]}]
    found, _ = check_codes(FHIR_JSON, "", request, "icd-10")
    assert (
        found == "MedicationRequest.reasonCode[0].coding[0] is ICD-9-CM 401.9; this connection expects ICD-10"
    )
    contained = {"resourceType": "Encounter", "contained": [_condition((ICD9, "250.00"))]}
    found, _ = check_codes(FHIR_JSON, json.dumps(contained), None, "icd-10")
    assert found.startswith("Encounter.contained[0].code.coding[0] is ICD-9-CM")


def test_unknown_fhir_systems_are_observed_and_identifiers_are_not_codings():
    obs = observation(2)
    obs["code"]["coding"].append({"system": "http://lab.example.org/codes", "code": "HGB-LOCAL"})
    obs["identifier"] = [{"system": "http://lab.example.org/ids", "value": "A-1"}]  # an Identifier
    found, observations = check_codes(FHIR_JSON, json.dumps(obs), None, "icd-10")
    assert found is None
    assert kinds(observations) == [("unknown_code_system", "Observation.code.coding[1]")]


@pytest.mark.parametrize("resource", [medication_request(1), observation(1), patient(1)])
def test_the_samples_codes_are_all_known(resource):
    assert check_codes(FHIR_JSON, json.dumps(resource), None, "icd-10") == (None, [])
    assert new_fhir_elements(resource) == []


def test_top_level_elements_r4b_does_not_define_are_observed():
    resource = medication_request(1)
    resource["priorityRank"] = 3
    resource["_status"] = {"extension": []}  # a primitive's extension is defined
    assert kinds(new_fhir_elements(resource)) == [("new_fhir_element", "MedicationRequest.priorityRank")]
    assert new_fhir_elements({"resourceType": "NotAResource", "x": 1}) == []
    assert new_fhir_elements({"resourceType": "CodeableConcept", "x": 1}) == []  # a datatype
    assert new_fhir_elements({"resourceType": "__class__"}) == []


def test_decode_payload_carries_the_code_set_problem_and_its_observations():
    raw = json.dumps(_condition((ICD9, "250.00")) | {"onsetWhen": "x"}).encode()
    decoded = decode_payload(raw, FHIR_JSON, "Condition", diagnosis_code_system="icd-10")
    assert decoded.problem is None and decoded.code_set_problem.startswith(
        "Condition.code.coding[0] is ICD-9-CM"
    )
    assert kinds(decoded.observations) == [
        ("new_fhir_element", "Condition.onsetWhen"),
        ("unknown_code_system", "Condition.code.coding[0]"),
    ]
    assert decode_payload(raw, FHIR_JSON, "Condition").code_set_problem is None  # not asked
    hl7 = adt("DG1|1||250.00^Diabetes^I9C").encode("cp1252")
    decoded = decode_payload(hl7, HL7_ER7, "ADT^A08", diagnosis_code_system="icd-10")
    assert (
        f"DG1-3 (Diagnosis Code) at byte offset {hl7.index(b'DG1|') + len(b'DG1|1||')}"
        in decoded.code_set_problem
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["coding", "system", "code", "value", "x", "code"]), children, max_size=4
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from(["icd-10", "icd-9", "any"]))
def test_any_json_never_raises(value, expected):
    document = {"resourceType": "Condition", "code": value}
    problem, observations = check_codes(FHIR_JSON, json.dumps(document), None, expected)
    assert problem is None or "this connection expects" in problem
    assert all(o.kind == "unknown_code_system" for o in observations)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["icd-10", "icd-9", "any"]))
def test_any_hl7_text_never_raises(text, expected):
    problem, _ = check_codes(HL7_ER7, MSH + "DG1|1||" + text, None, expected)
    assert problem is None or "this connection expects" in problem


def test_a_deeply_nested_document_is_walked_only_so_far():
    deep: dict = {"system": ICD9, "code": "250.00"}
    for _ in range(500):
        deep = {"x": deep}
    assert check_codes(FHIR_JSON, "", {"resourceType": "Condition", "code": deep}, "icd-10") == (None, [])


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("LN", True),
        ("I10C", True),
        ("ISO639", True),  # PID-15 languages
        ("CDCREC", True),  # PID-10 race
        ("HL70357", True),  # an HL7 table
        ("99LAB", True),  # local, as table 0396 allows
        ("L", True),
        ("MYLAB", False),
        ("POST 12H CFST:MCNC:PT:SER/PLAS:QN", False),  # text where the system belongs
    ],
)
def test_hl7_coding_system_names(name, known):
    assert bool(hl7_system(name)[0]) is known
