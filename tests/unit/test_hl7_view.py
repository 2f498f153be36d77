"""The HL7 v2 viewer (app/domain/hl7_view.py): fields numbered and named, repetitions, components and
subcomponents split, the field a problem names flagged (ERR-2, `PID-7`, a byte offset), values
masked for roles without PHI access, control characters visible in the raw view, and no input
that makes it raise."""

from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.hl7 import ack_outcome
from app.domain.hl7_view import MASK, hl7_view

# Written for these tests: an ADT^A08 with two PID-3 identifiers (the second with an assigning
# authority split into subcomponents), a Z-segment and an empty PID-7.
ADT = (
    "MSH|^~\\&|RECON|MERCY|EHR|LAB|20261202101500||ADT^A08^ADT_A01|C1|P|2.5.1\r"
    "EVN|A08|20261202101500\r"
    "PID|1||MRN-00042^^^MERCY^MR~999-12-3456^^^SSA&2.16.840.1.113883.4.1&ISO^SS||NUÑEZ^MARÍA^J||\r"
    "NK1|1|NUÑEZ^PEDRO|SPO\r"
    "PV1|1|I|4W^401^A\r"
    "ZXX|site value|other\r"
    "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL\r"
    "OBX|2|NM|789-8^Erythrocytes^LN||4.1|10*6/uL"
)


def segment(view, name, sequence=1):
    return next(s for s in view.segments if s.name == name and s.sequence == sequence)


def field(view, position, sequence=1):
    name, number = position.split("-")
    return next(f for f in segment(view, name, sequence).fields if f.number == int(number))


def flagged(view) -> list[str]:
    return [f"{f.position}@{s.sequence}" for s in view.segments for f in s.fields if f.flags]


def ack(err: str) -> list[dict]:
    """Issues as the MLLP adapter records them from an AE acknowledgement."""
    text = f"MSH|^~\\&|EHR|LAB|RECON|MERCY|20261202||ACK^A08|A1|P|2.5.1\rMSA|AE|C1\r{err}"
    return ack_outcome(text, "C1").issues


def test_parsed_with_python_hl7_fields_numbered_and_named_msh1_is_the_separator():
    view = hl7_view(ADT)
    assert view.parser == "python-hl7"
    assert [s.name for s in view.segments] == ["MSH", "EVN", "PID", "NK1", "PV1", "ZXX", "OBX", "OBX"]
    assert (field(view, "MSH-1").value, field(view, "MSH-1").name) == ("|", "Field Separator")
    assert (field(view, "MSH-2").value, field(view, "MSH-2").name) == ("^~\\&", "Encoding Characters")
    assert not field(view, "MSH-2").structured  # the encoding characters are not split by themselves
    assert (field(view, "MSH-10").value, field(view, "MSH-10").name) == ("C1", "Message Control ID")
    assert field(view, "PID-5").name == "Patient Name"
    assert field(view, "NK1-2").name == "Name"
    assert segment(view, "ZXX").description == "Z-segment (site-defined)"
    assert field(view, "ZXX-1").name == "site-defined"


def test_repetitions_and_components_are_split_and_numbered():
    pid3 = field(hl7_view(ADT), "PID-3")
    assert [r.number for r in pid3.repetitions] == [1, 2]
    first, second = pid3.repetitions
    assert [(c.number, c.value) for c in first.components if c.value] == [
        (1, "MRN-00042"),
        (4, "MERCY"),
        (5, "MR"),
    ]
    assert [(c.number, c.value) for c in second.components if c.value][0] == (1, "999-12-3456")
    name = field(hl7_view(ADT), "PID-5")
    assert [c.value for c in name.repetitions[0].components] == ["NUÑEZ", "MARÍA", "J"]


def test_subcomponents_are_split():
    authority = field(hl7_view(ADT), "PID-3").repetitions[1].components[3]
    assert authority.number == 4
    assert authority.subcomponents == ["SSA", "2.16.840.1.113883.4.1", "ISO"]
    assert authority.value == "SSA&2.16.840.1.113883.4.1&ISO"


def test_custom_separators_from_msh2_are_honoured():
    view = hl7_view("MSH#*!\\@#A#B\rPID#1##X*Y!Z@W")
    pid3 = field(view, "PID-3")
    assert field(view, "MSH-1").value == "#" and field(view, "MSH-2").value == "*!\\@"
    assert [[c.value for c in r.components] for r in pid3.repetitions] == [["X", "Y"], ["Z@W"]]
    assert pid3.repetitions[1].components[0].subcomponents == ["Z", "W"]


def test_the_field_an_err_segment_names_is_flagged_and_an_empty_one_shown():
    view = hl7_view(ADT, issues=ack("ERR||PID^1^7|101^Required field missing^HL70357|E"))
    assert flagged(view) == ["PID-7@1"]
    pid7 = field(view, "PID-7")
    assert pid7.flags == ["issue 1"] and pid7.name == "Date/Time of Birth"
    assert pid7 in segment(view, "PID").rows  # empty, but shown because it is named
    assert view.first_flag_id == "hl7-3-7"


def test_err2_segment_sequence_picks_the_occurrence_and_its_component():
    # An interface engine's report carries the ERR segment itself: ERL segment^sequence^field^rep^component.
    view = hl7_view(ADT, detail="reported by svc: MSA|AE|C1\rERR||OBX^2^5^1^1|102|E")
    assert flagged(view) == ["OBX-5@2"]
    assert [c.flagged for c in field(view, "OBX-5", 2).repetitions[0].components] == [True]


def test_a_location_written_pid_7_in_an_issue_or_the_exception_detail_is_flagged():
    by_issue = hl7_view(ADT, issues=[{"severity": "error", "expression": ["PID-7"], "diagnostics": "x"}])
    assert flagged(by_issue) == ["PID-7@1"]
    reported = "reported by svc: MSA|AE|C1\rERR||PID^1^7|101^Required field missing^HL70357|E"
    assert flagged(hl7_view(ADT, detail=reported)) == ["PID-7@1"]
    assert field(hl7_view(ADT, detail=reported), "PID-7").flags == ["exception detail"]
    # without a segment sequence every OBX is meant
    assert flagged(hl7_view(ADT, detail="OBX-3 uses an unknown code system")) == ["OBX-3@1", "OBX-3@2"]
    assert flagged(hl7_view(ADT, detail="HTTP 422 from the EHR")) == []


def test_a_byte_offset_flags_its_segment_and_field():
    offset = ADT.index("NUÑEZ^MARÍA")  # characters before it are ASCII: the same count in bytes
    view = hl7_view(ADT, raw=ADT.encode("utf-8"), detail=f"parse error at offset {offset}")
    pid = segment(view, "PID")
    assert pid.flags == [f"exception detail: byte {offset}"]
    assert flagged(view) == ["PID-5@1"]
    assert [line.flagged for line in view.raw_lines] == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_a_byte_offset_counts_in_the_stored_bytes_not_the_text():
    text = "MSH|^~\\&|A|B|C|D|2026||ADT^A08|C1|P|2.5.1\rPID|1||ÄÖÜ^ÄÖÜ^ÄÖÜ^ÄÖÜ\rPV1|1|I\rOBX|1|NM|718-7"
    raw = text.encode("utf-8")  # 12 bytes more than characters in the PID line
    offset = raw.index(b"PV1|1|I") + 6  # PV1-2 in the bytes; counted in characters it would be OBX
    view = hl7_view(text, raw=raw, issues=[{"diagnostics": f"unexpected byte at offset {offset}"}])
    assert flagged(view) == ["PV1-2@1"]


def test_an_offset_past_the_end_flags_the_last_segment():
    view = hl7_view(ADT, detail="truncated: expected a segment at offset 99999")
    assert view.segments[-1].flags and not view.segments[0].flags


def test_masked_view_hides_patient_values_but_keeps_structure_codes_and_flags():
    view = hl7_view(ADT, masked=True, issues=ack("ERR||PID^1^5|101|E"))
    for position in ("PID-3", "PID-5", "NK1-2", "PV1-3", "OBX-5", "ZXX-1"):
        f = field(view, position)
        assert f.masked and "MERCY" not in f.value and "NUÑEZ" not in f.value, position
        assert {c.value for r in f.repetitions for c in r.components} <= {MASK, "", f"{MASK}&{MASK}&{MASK}"}
    pid3 = field(view, "PID-3")
    assert len(pid3.repetitions) == 2 and pid3.repetitions[1].components[3].subcomponents == [MASK] * 3
    for position, value in (("MSH-9", "ADT^A08^ADT_A01"), ("EVN-1", "A08"), ("OBX-3", "718-7^Hemoglobin^LN")):
        assert (field(view, position).value, field(view, position).masked) == (value, False)
    assert flagged(view) == ["PID-5@1"]
    assert view.raw_lines == []  # no raw view without PHI access
    every_value = " ".join(f.value for s in view.segments for f in s.fields)
    for phi in ("MRN-00042", "999-12-3456", "NUÑEZ", "PEDRO", "4W", "13.2", "site value"):
        assert phi not in every_value


def test_an_unknown_segment_is_masked_by_default():
    view = hl7_view("MSH|^~\\&|A\rQQQ|secret^value", masked=True)
    assert field(view, "QQQ-1").value == f"{MASK}^{MASK}"


def test_raw_view_shows_control_characters():
    framed = "\x0b" + ADT.replace("\r", "\r\n", 1) + "\x00\t\x85\r\x1c\r"
    lines = hl7_view(framed).raw_lines
    first = lines[0].pieces
    assert (first[0].text, first[0].control) == ("<VT>", "VT (0x0B), MLLP start block")
    assert first[1].text.startswith("MSH|^~\\&|RECON") and not first[1].control
    assert [p.text for p in first[-2:]] == ["<CR>", "<LF>"]  # CR LF, then the line ends
    last_segment = [p.text for p in lines[-2].pieces]
    assert last_segment[-4:] == ["<NUL>", "<TAB>", "<85>", "<CR>"]
    assert [p.text for p in lines[-1].pieces] == ["<FS>", "<CR>"] and lines[-1].segment is None
    assert sum(1 for line in lines if line.segment) == 8


def test_lf_separated_and_crlf_messages_parse_like_cr_ones():
    for separator in ("\n", "\r\n"):
        view = hl7_view(ADT.replace("\r", separator))
        assert view.parser == "python-hl7" and len(view.segments) == 8
        assert field(view, "PID-3").repetitions[1].components[0].value == "999-12-3456"


def test_garbage_falls_back_to_the_hand_splitter():
    view = hl7_view("PID|1||X^Y\rthis is not hl7")
    assert view.parser.startswith("split by hand")
    assert [c.value for c in field(view, "PID-3").repetitions[0].components] == ["X", "Y"]
    assert view.segments[1].name == "" and view.segments[1].fields[0].position == "text"
    broken_header = hl7_view("MSH|^")
    assert broken_header.parser.startswith("split by hand") and field(broken_header, "MSH-1").value == "|"


_pieces = st.sampled_from(["MSH", "PID", "ZXX", "|", "^", "~", "&", "\\", "\r", "\n", "\x0b", "\x1c", "-7 "])
_messages = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=60).map("".join),
    st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=60).map(lambda parts: ADT + "".join(parts)),
)


@settings(max_examples=300, deadline=None)
@given(
    text=_messages,
    detail=st.one_of(
        st.none(), st.text(max_size=40), st.from_regex(r"(PID|MSH|OBX)[-^]\d{1,2}|offset \d{1,5}")
    ),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
    masked=st.booleans(),
)
def test_the_viewer_never_raises(text, detail, raw, masked):
    issues = [{"expression": [detail or ""], "diagnostics": detail or ""}]
    view = hl7_view(text, issues=issues, detail=detail, raw=raw, masked=masked)
    assert view.masked == masked
    if masked:
        assert view.raw_lines == []
    else:
        assert "".join(p.text for line in view.raw_lines for p in line.pieces if not p.control) == "".join(
            c for c in text if ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F and c != "\ufeff"
        )


def test_an_ack_issue_flags_only_the_segment_its_err2_locates():
    import hl7

    from app.domain.hl7 import _err_issue

    ack = hl7.parse(
        "MSH|^~\\&|EHR|X|R|Y|20261202||ACK|A1|P|2.5.1\rMSA|AE|C1\rERR||OBX^2^5|207^bad value^HL70357|E"
    )
    issue = _err_issue(ack.segments("ERR")[0])
    message = (
        "MSH|^~\\&|LAB|X|EHR|Y|20261202||ORU^R01|C1|P|2.5.1\rPID|1||42\rOBR|1|O1||GLU^Glucose\r"
        "OBX|1|NM|GLU^Glucose||95|mg/dL\rOBX|2|NM|K^Potassium||x|mmol/L"
    )
    view = hl7_view(message, issues=[issue])
    flagged = [(seg.name, seg.sequence) for seg in view.segments if seg.flagged]
    assert flagged == [("OBX", 2)]
