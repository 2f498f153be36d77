"""Issue 8: a reviewer sees what a correction changed at field level, never the layout it was sent in.

Expectations are written out by hand from the rules in app/domain/payload_diff.py's docstring:
FHIR paths FHIRPath-like with a JSON Pointer beside them, HL7 v2 as segment-field-component."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.payload_diff import (
    ADDED,
    CHANGED,
    MAX_CHANGES,
    MAX_VALUE_CHARS,
    REMOVED,
    Change,
    changes,
    issue_targets,
    normalise,
    review,
    text_diff,
)
from app.domain.payloads import FHIR_JSON, HL7_ER7

MINIFIED = (
    '{"subject":{"reference":"Patient/123456"},"status":"active","resourceType":"MedicationRequest",'
    '"dosageInstruction":[{"text":"1 tablet daily","doseAndRate":[{"doseQuantity":{"value":1.0}}]}],'
    '"medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm",'
    '"code":"313782"}]},"id":"rx-1","meta":{"profile":["http://example.org/p"]}}'
)

PRETTY = """{
  "resourceType": "MedicationRequest",
  "id": "rx-1",
  "meta": {
    "profile": [
      "http://example.org/p"
    ]
  },
  "dosageInstruction": [
    {
      "doseAndRate": [
        {
          "doseQuantity": {
            "value": 1.0
          }
        }
      ],
      "text": "1 tablet daily"
    }
  ],
  "medicationCodeableConcept": {
    "coding": [
      {
        "code": "313782",
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm"
      }
    ]
  },
  "status": "active",
  "subject": {
    "reference": "Patient/123456"
  }
}"""


def edited(**changes_) -> str:
    doc = json.loads(MINIFIED)
    doc.update(changes_)
    return json.dumps(doc)


# --- normalise ---------------------------------------------------------------------------------------


def test_fhir_is_pretty_printed_with_resource_type_id_meta_first_then_alphabetical():
    assert normalise(FHIR_JSON, MINIFIED) == PRETTY


def test_normalising_twice_changes_nothing():
    assert normalise(FHIR_JSON, PRETTY) == PRETTY


def test_a_primitive_extension_sits_right_after_its_element_and_numbers_keep_their_digits():
    text = '{"resourceType":"Patient","gender":"x","_birthDate":{"id":"e"},"birthDate":"1970","w":1.50}'
    assert normalise(FHIR_JSON, text).splitlines() == [
        "{",
        '  "resourceType": "Patient",',
        '  "birthDate": "1970",',
        '  "_birthDate": {',
        '    "id": "e"',
        "  },",
        '  "gender": "x",',
        '  "w": 1.50',
        "}",
    ]


def test_invalid_json_is_returned_as_it_is():
    assert normalise(FHIR_JSON, '{"resourceType": "Patient",') == '{"resourceType": "Patient",'
    assert normalise(FHIR_JSON, None) == ""


def test_hl7_is_one_segment_per_line_whatever_separated_them():
    assert normalise(HL7_ER7, "MSH|^~\\&|A\r\nPID|1\r\rPV1|1\n") == "MSH|^~\\&|A\nPID|1\nPV1|1"


# --- FHIR changes ------------------------------------------------------------------------------------


def test_adding_intent_is_exactly_one_added_path():
    assert changes(FHIR_JSON, MINIFIED, edited(intent="order")) == [
        Change("MedicationRequest.intent", None, '"order"', ADDED, "/intent")
    ]


def test_the_text_diff_of_adding_intent_is_one_line_not_the_whole_payload():
    diff = text_diff(FHIR_JSON, MINIFIED, edited(intent="order"))
    assert [d.text for d in diff if d.kind in ("add", "del")] == ['+  "intent": "order",']


def test_reordered_keys_and_layout_are_no_change():
    reordered = json.dumps(dict(reversed(list(json.loads(MINIFIED).items()))), indent=4)
    assert changes(FHIR_JSON, MINIFIED, reordered) == []
    assert text_diff(FHIR_JSON, MINIFIED, reordered) == []
    assert "no field differs" in review(FHIR_JSON, MINIFIED, reordered).note


def test_arrays_are_compared_by_index():
    before = '{"resourceType":"Patient","name":[{"given":["Ann","Marie"]},{"family":"Old"}]}'
    after = '{"resourceType":"Patient","name":[{"given":["Anne"]},{"family":"New"},{"family":"Alias"}]}'
    assert changes(FHIR_JSON, before, after) == [
        Change("Patient.name[0].given[0]", '"Ann"', '"Anne"', CHANGED, "/name/0/given/0"),
        Change("Patient.name[0].given[1]", '"Marie"', None, REMOVED, "/name/0/given/1"),
        Change("Patient.name[1].family", '"Old"', '"New"', CHANGED, "/name/1/family"),
        Change("Patient.name[2]", None, '{"family": "Alias"}', ADDED, "/name/2"),
    ]


def test_json_types_are_not_pythons_true_is_not_1_and_precision_counts():
    before = '{"resourceType":"Observation","a":true,"b":"1","c":1.0}'
    after = '{"resourceType":"Observation","a":1,"b":1,"c":1.00}'
    assert [(c.path, c.old, c.new) for c in changes(FHIR_JSON, before, after)] == [
        ("Observation.a", "true", "1"),
        ("Observation.b", '"1"', "1"),
        ("Observation.c", "1.0", "1.00"),
    ]


def test_odd_keys_are_quoted_in_the_path_and_escaped_in_the_pointer():
    found = changes(FHIR_JSON, '{"a/b~c": 1, "x-y": 1}', '{"a/b~c": 2, "x-y": 2}')
    assert [(c.path, c.pointer) for c in found] == [("$.`a/b~c`", "/a~1b~0c"), ("$.`x-y`", "/x-y")]


def test_invalid_json_never_raises_and_gives_no_field_list_but_a_text_diff():
    result = review(FHIR_JSON, MINIFIED, '{"resourceType": "MedicationRequest", "status": ')
    assert result.changes == [] and "not valid JSON" in result.note
    assert any(d.kind == "add" for d in result.diff)


def test_a_huge_change_is_bounded_and_values_are_cut():
    before = json.dumps({"resourceType": "Basic", "v": [str(i) for i in range(500)], "t": "a"})
    after = json.dumps({"resourceType": "Basic", "v": [str(i + 1) for i in range(500)], "t": "b" * 5000})
    result = review(FHIR_JSON, before, after)
    assert len(result.changes) == MAX_CHANGES and result.truncated
    long = changes(FHIR_JSON, '{"t": "a"}', json.dumps({"t": "b" * 5000}))[0]
    assert len(long.new) == MAX_VALUE_CHARS and long.new.endswith("…")


def test_a_deeply_nested_document_never_raises():
    deep = "[" * 5000 + "]" * 5000
    assert normalise(FHIR_JSON, deep) == deep
    assert isinstance(changes(FHIR_JSON, deep, "[]"), list)


# --- HL7 v2 changes ----------------------------------------------------------------------------------

ADT = (
    "MSH|^~\\&|REGADT|MERCY|EHR|MERCY|20261202101500||ADT^A08^ADT_A01|MSG00042|P|2.5.1\r"
    "EVN|A08|20261202101500\r"
    "PID|1||MRN-00042^^^MERCY^MR~PAT-77^^^EPI^PI||NUÑEZ^MARÍA^J||19800101|F\r"
    "OBX|1|NM|8867-4^Heart rate^LN||72|/min\r"
    "OBX|2|NM|8480-6^Systolic^LN||120|mm[Hg]"
)


def test_a_component_change_is_named_segment_field_component():
    assert changes(HL7_ER7, ADT, ADT.replace("NUÑEZ", "NUNEZ")) == [
        Change("PID-5.1", "NUÑEZ", "NUNEZ", CHANGED)
    ]


def test_a_change_in_a_second_repetition_names_the_repetition():
    assert changes(HL7_ER7, ADT, ADT.replace("PAT-77", "PAT-78")) == [
        Change("PID-3[2].1", "PAT-77", "PAT-78", CHANGED)
    ]


def test_a_repeated_segment_is_named_by_its_occurrence_and_a_plain_field_by_its_number():
    assert changes(HL7_ER7, ADT, ADT.replace("||120|", "||135|")) == [
        Change("OBX[2]-5", "120", "135", CHANGED)
    ]


def test_an_added_segment_and_an_emptied_field():
    after = ADT.replace("|19800101|F", "||F") + "\rNTE|1||checked by phone"
    assert changes(HL7_ER7, ADT, after) == [
        Change("PID-7", "19800101", None, REMOVED),
        Change("NTE", None, "NTE|1||checked by phone", ADDED),
    ]


def test_a_segment_inserted_in_the_middle_does_not_shift_the_others():
    after = ADT.replace("\rOBX|1", "\rNTE|1||note\rOBX|1")
    assert changes(HL7_ER7, ADT, after) == [Change("NTE", None, "NTE|1||note", ADDED)]


def test_an_hl7_batch_past_the_field_tables_segment_limit_gets_the_text_diff_and_says_why():
    batch = ADT + "".join(f"\rOBX|{n}|NM|x||{n}" for n in range(3, 1100))
    result = review(HL7_ER7, batch, batch.replace("OBX|1099|NM|x||1099", "OBX|1099|NM|x||9"))
    assert result.changes == [] and "too large" in result.note
    assert [d.text for d in result.diff if d.kind == "add"] == ["+OBX|1099|NM|x||9"]


def test_hl7_line_endings_are_no_change():
    assert changes(HL7_ER7, ADT, ADT.replace("\r", "\r\n")) == []
    assert text_diff(HL7_ER7, ADT, ADT.replace("\r", "\n")) == []


# --- where the issues point --------------------------------------------------------------------------


def test_a_fhir_issue_points_at_the_line_of_its_expression_or_its_nearest_parent():
    issues = [
        {"expression": ["MedicationRequest.dosageInstruction[0].text"]},
        {"expression": ["MedicationRequest.intent"]},  # missing: the resource itself
        {"diagnostics": "no expression"},
    ]
    targets = issue_targets(FHIR_JSON, PRETTY, issues)
    lines = PRETTY.splitlines()
    assert [(t.label, t.line, t.exact) for t in targets] == [("issue 1", 18, True), ("issue 2", 1, False)]
    assert lines[17].strip() == '"text": "1 tablet daily"'


def test_an_hl7_issue_points_at_the_field_on_its_segment_line():
    text = normalise(HL7_ER7, ADT)
    [target] = issue_targets(HL7_ER7, text, [{"location": "PID^1^7", "diagnostics": "bad date"}])
    line = text.splitlines()[target.line - 1]
    assert target.path == "PID-7" and line.startswith("PID|")
    assert line[target.start : target.end] == "19800101"


def test_no_targets_when_the_text_is_not_laid_out_as_the_editor_opens_it():
    assert issue_targets(FHIR_JSON, MINIFIED, [{"expression": ["MedicationRequest.status"]}]) == []


# --- properties --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from([FHIR_JSON, HL7_ER7, "text/plain"]))
def test_changes_of_a_text_against_itself_are_empty_and_nothing_raises(text, content_type):
    assert changes(content_type, text, text) == []
    normalise(content_type, text)
    review(content_type, text, text + "x")
    issue_targets(content_type, text, [{"expression": [text[:20]], "location": text[:20]}], text[:40])


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_json_changes_are_empty_exactly_when_the_documents_are_equal(a, b):
    found = changes(FHIR_JSON, json.dumps(a), json.dumps(b))
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (found == []) == same
    assert changes(FHIR_JSON, json.dumps(a), normalise(FHIR_JSON, json.dumps(a))) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ABC^~&|\\ 12", max_size=20), min_size=1, max_size=6))
def test_hl7_changes_never_raise_and_a_message_equals_itself(fields):
    text = "MSH|^~\\&|A\r" + "\r".join(f"PID|{f}" for f in fields)
    assert changes(HL7_ER7, text, text.replace("\r", "\n")) == []
    changes(HL7_ER7, text, text.replace("A", "B"))
