"""SPEC 2: intake never drops data — decoding never raises and always keeps the bytes."""

import json

import pytest
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


# --- one decoding module: the rule that fired, MSH-18, Windows-1252 before Latin-1, mojibake ----

from app.domain.payloads import declared_charset, decode_text, detect_mojibake, encode_text  # noqa: E402


def hl7(msh18: str = "", pid5: str = "DOE^JANE") -> str:
    return (
        f"MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||ADT^A08|CTRL0001|P|2.5.1||||||{msh18}\r"
        f"PID|1||123456^^^MRN||{pid5}||19800101|F"
    )


def test_msh18_is_read_from_the_bytes_and_its_first_repetition_wins():
    assert declared_charset(hl7("8859/1").encode()) == "8859/1"
    assert declared_charset(hl7("UNICODE UTF-8~8859/1").encode()) == "UNICODE UTF-8"
    assert declared_charset(hl7().encode()) is None
    assert declared_charset(b"PID|1||x") is None and declared_charset(b"") is None


@pytest.mark.parametrize(
    ("raw", "content_type", "text", "encoding", "rule"),
    [
        (hl7("8859/1", "M\xdcLLER^J\xdcRGEN").encode("latin-1"), HL7_ER7, "MÜLLER", "iso-8859-1", "MSH-18 8859/1"),
        (hl7("", "Nguyễn^Văn").encode(), HL7_ER7, "Nguyễn", "utf-8", "strict UTF-8"),
        ("\ufeff".encode() + hl7().encode(), HL7_ER7, "DOE^JANE", "utf-8-sig", "strict UTF-8 (BOM)"),
        (hl7("", "O\u2019BRIEN \u2013 JR").encode("cp1252"), HL7_ER7, "O’BRIEN – JR", "cp1252", "Windows-1252: not UTF-8"),
        (hl7("UNICODE UTF-8", "M\xfcller").encode("cp1252"), HL7_ER7, "Müller", "cp1252", "MSH-18 declares UNICODE UTF-8 but byte"),
        (hl7("KLINGON", "DOE").encode(), HL7_ER7, "DOE", "utf-8", "MSH-18 'KLINGON' is not a known character set"),
        (b"MSH|^~\\&|A\x81\x8d", HL7_ER7, "A\x81\x8d", "latin-1", "Latin-1, last resort"),
    ],
)  # fmt: skip
def test_each_decoding_rule_and_what_it_records(raw, content_type, text, encoding, rule):
    decoded = decode_text(raw, content_type)
    assert text in decoded.text and decoded.encoding == encoding and rule in decoded.rule


def test_a_cp1252_en_dash_is_shown_as_a_dash_never_a_control_character():
    decoded = decode_text("dose 5 \u2013 10 mg".encode("cp1252"), HL7_ER7)
    assert "\u2013" in decoded.text and "\x96" not in decoded.text


def test_fhir_json_that_is_not_utf8_is_a_problem_but_readable():
    decoded = decode_text('{"note": "Nuñez – dose"}'.encode("cp1252"), FHIR_JSON)
    assert decoded.problem == "payload is not valid UTF-8 (byte 12)" and "Nuñez – dose" in decoded.text


def test_double_encoded_utf8_is_detected_located_and_repaired_only_as_a_proposal():
    text = hl7("", "MÃ¼ller^JÃ¼rgen")
    repair = detect_mojibake(text, HL7_ER7)
    assert repair.where == "PID-5" and "Müller^Jürgen" in repair.repaired_text
    assert "encode latin-1" in repair.explanation
    decoded = decode_payload(text.encode(), HL7_ER7, "ADT^A08")
    assert decoded.problem_kind == "mojibake" and "PID-5" in decoded.problem
    assert decoded.text == text  # never silently changed


@pytest.mark.parametrize(
    "name", ["Müller", "Nguyễn Văn An", "Παπαδόπουλος", "Иванов", "محمد", "李小龍", "O'Brien – Jr"]
)
def test_real_names_in_any_script_are_not_called_mojibake(name):
    assert detect_mojibake(hl7("", name), HL7_ER7) is None


def test_corrections_are_encoded_in_the_declared_character_set():
    assert encode_text(hl7("8859/1", "MÜLLER"), HL7_ER7) == hl7("8859/1", "MÜLLER").encode("latin-1")
    assert encode_text(hl7("8859/1", "李"), HL7_ER7) == hl7("8859/1", "李").encode("utf-8")  # does not fit
    assert encode_text('{"a": "ü"}', FHIR_JSON) == '{"a": "ü"}'.encode()


@given(st.text(max_size=300))
def test_utf8_text_round_trips_byte_for_byte(text):
    raw = text.encode("utf-8")
    decoded = decode_text(raw, HL7_ER7)
    if not text.startswith("\ufeff") and declared_charset(raw) is None:
        assert decoded.text == text and decoded.encoding == "utf-8"


def test_a_repair_proposal_keeps_a_lone_surrogate_as_its_escape():
    """A FHIR string may hold a lone surrogate as a \\u escape (valid JSON, no UTF-8 form): the
    proposed repair of mojibake elsewhere in the resource must still be storable text (it was a
    UnicodeEncodeError and a 500 at intake), with every other value as repaired."""
    text = json.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "a\ud800b", "value": "x"}],
            "name": [{"text": "JosÃ©"}],
        }
    )
    repair = detect_mojibake(text, "application/fhir+json")
    assert repair is not None and repair.where == "name[0].text"
    repaired = json.loads(encode_text(repair.repaired_text, "application/fhir+json"))
    assert repaired["identifier"][0]["system"] == "a\ud800b" and repaired["name"][0]["text"] == "José"
