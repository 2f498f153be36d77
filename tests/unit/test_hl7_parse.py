"""Issue 5: parsing HL7 v2 never raises past intake; what cannot be used is a data_shape problem
naming segment, field and offset; what is merely odd is observed (drift), never refused."""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.hl7_parse import check_er7, er7_segments, read_separators
from app.domain.payloads import HL7_ER7, decode_payload

MSH = "MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||{type}|CTRL0001|P|2.5.1"

# Realistic messages of each type the simulator speaks, shaped after the HL7 v2.5.1 chapter examples
# (synthetic people and codes); the mutation test starts from these.
ADT_A01 = (
    MSH.format(type="ADT^A01^ADT_A01") + "\r"
    "EVN|A01|20240501120000\r"
    "PID|1||MRN-00042^^^MERCY^MR||DOE^JANE^Q||19800101|F|||12 MAIN ST^^SPRINGFIELD^IL^62701\r"
    "PV1|1|I|4W^401^A|||||1234^WELBY^MARCUS\r"
    "DG1|1||E11.9^Type 2 diabetes mellitus without complications^I10C"
)
ORU_R01 = (
    MSH.format(type="ORU^R01") + "\r"
    "PID|1||123456^^^MRN||DOE^JANE||19800101|F\r"
    "OBR|1|ORD1|FIL1|718-7^Hemoglobin^LN\r"
    "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL^^UCUM|12-16|N|||F\r"
    "NTE|1||Specimen slightly hemolyzed \\T\\ rerun"
)
ORM_O01 = (
    MSH.format(type="ORM^O01") + "\r"
    "PID|1||123456^^^MRN||DOE^JANE||19800101|F\r"
    "ORC|NW|ORD-1001|||||^^^20240501120000^^R\r"
    "OBR|1|ORD-1001||24323-8^Comprehensive metabolic panel^LN"
)
SIU_S12 = (
    MSH.format(type="SIU^S12") + "\r"
    "SCH|APT-1|APT-1|||||ROUTINE^Routine^HL70276|||30|m\r"
    "PID|1||123456^^^MRN||DOE^JANE||19800101|F"
)
REAL = [ADT_A01, ORU_R01, ORM_O01, SIU_S12]


@pytest.mark.parametrize(
    ("message", "message_type"),
    [(ADT_A01, "ADT^A01"), (ORU_R01, "ORU^R01"), (ORM_O01, "ORM^O01"), (SIU_S12, "SIU^S12")],
)
def test_well_formed_messages_pass_without_observations(message, message_type):
    check = check_er7(message, message_type=message_type)
    assert check.problem is None and check.observations == ()
    assert check.message_type == message_type


# (what is broken, the message, text the problem must contain — segment, field and offset)
BROKEN = [
    ("no MSH", "PID|1||123456", ["does not start with an MSH segment", "offset 0"]),
    ("empty", "", ["does not start with an MSH segment"]),
    ("batch header", "FHS|^~\\&|LAB\r" + ORU_R01, ["HL7 batch", "FHS", "recon import"]),
    ("MSH cut after its name", "MSH", ["MSH-1 (Field Separator) is missing", "offset 3"]),
    ("letter as separator", "MSHA^~\\&A", ["MSH-1 (Field Separator) 'A'", "offset 3"]),
    ("two encoding characters", "MSH|^~|RECON", ["MSH-2 (Encoding Characters) '^~'", "offset 4"]),
    ("encoding char repeats", "MSH|^^\\&|RECON", ["MSH-2 (Encoding Characters) '^^\\&'", "distinct"]),
    ("empty MSH-9", ORU_R01.replace("|ORU^R01|", "||"), ["MSH-9 (Message Type) is empty", "offset 47"]),
    ("MSH-9 only separators", ORU_R01.replace("|ORU^R01|", "|^|"), ["MSH-9 (Message Type) is empty"]),
    ("not a v2 version", ORU_R01.replace("|2.5.1", "|3.0"), ["MSH-12 (Version ID) '3.0'", "offset 66"]),
    (
        "digit in a segment name",
        ORU_R01.replace("PID|", "P1D|"),
        ["segment 2 'P1D' is not a segment name", f"offset {ORU_R01.index('PID|')}"],
    ),
    ("lower-case name", ORU_R01.replace("OBR|", "obr|"), ["segment 3 'obr' is not a segment name"]),
    ("name too long", ORU_R01.replace("OBX|", "OBXX|"), ["segment 4 'OBXX' is not a segment name"]),
    (
        "line break inside a field",
        ORU_R01.replace("rerun", "rerun\nsee below"),
        ["segment 6 'see below' is not a segment name", "a line break inside a field?"],
    ),
    ("second message glued on", ORU_R01 + "\r" + ORM_O01, ["segment 6 is a second MSH", "one message"]),
    ("MLLP end block inside", ORU_R01.replace("|N|", "|N\x1c|"), ["OBX holds the MLLP framing character"]),
    (
        "A01 without PV1",
        ADT_A01.replace("PV1|1|I|4W^401^A|||||1234^WELBY^MARCUS\r", ""),
        ["message is truncated: no PV1 segment after MSH for ADT^A01"],
    ),
    (
        "ORU cut after the order",
        ORU_R01.split("\rOBX")[0],
        ["message is truncated: no OBX segment after MSH for ORU^R01", "ends at character offset"],
    ),
    ("ORM without ORC", ORM_O01.replace("ORC|", "NTE|"), ["no ORC segment after MSH for ORM^O01"]),
    ("SIU without SCH", SIU_S12.replace("SCH|", "NTE|"), ["no SCH segment after MSH for SIU^S12"]),
    ("A08 with nothing after MSH", MSH.format(type="ADT^A08"), ["no PID segment after MSH for ADT^A08"]),
]


@pytest.mark.parametrize(("what", "message", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_messages_are_refused_naming_segment_field_and_offset(what, message, expected):
    check = check_er7(message)
    assert check.problem is not None, what
    for text in expected:
        assert text in check.problem, (text, check.problem)
    assert check.kind == "parse"


def test_a_type_other_than_the_one_submitted_is_a_shape_problem():
    check = check_er7(ORU_R01, message_type="ADT^A08")
    assert check.kind == "shape" and check.where == "MSH-9"
    assert (
        check.problem
        == "MSH-9 (Message Type) 'ORU^R01' at character offset 47 does not match message_type 'ADT^A08'"
    )
    assert check_er7(ADT_A01, message_type="ADT^A01").problem is None  # MSH-9.3 is not compared
    assert check_er7(ADT_A01, message_type="ADT").problem is None  # as far as the sender spelled it


def test_offsets_are_bytes_of_the_stored_payload_when_the_encoding_is_known():
    message = ORU_R01.replace("DOE^JANE", "MÜLLER^JÖRG").replace("OBX|", "O8X|")
    for encoding in ("utf-8", "cp1252", "utf-8-sig"):
        raw = ("\ufeff" if encoding == "utf-8-sig" else "").encode() + message.encode(
            encoding.removesuffix("-sig")
        )
        check = check_er7(message, encoding=encoding)
        assert f"'O8X' is not a segment name at byte offset {raw.index(b'O8X|')}" in check.problem, encoding
    assert f"at character offset {message.index('O8X|')}" in check_er7(message).problem


def test_every_line_ending_is_a_segment_end():
    for ending in ("\r", "\r\n", "\n"):
        message = ORU_R01.replace("\r", ending) + ending
        assert check_er7(message).problem is None, repr(ending)
        assert [s.name for s in er7_segments(message)] == ["MSH", "PID", "OBR", "OBX", "NTE"]
    framed = "\x0b" + ORU_R01 + "\x1c\r"  # pasted with its MLLP frame
    assert check_er7(framed).problem is None


# (what is odd, the message, (kind, where) observed) — none of these is refused
OBSERVED = [
    ("Z-segment", ADT_A01 + "\rZPD|1|VIP", ("z_segment", "ZPD")),
    ("unknown segment", ADT_A01 + "\rXYZ|1", ("unknown_segment", "XYZ")),
    ("empty PID-3", ADT_A01.replace("MRN-00042^^^MERCY^MR", ""), ("missing_required_field", "PID-3")),
    ("PID-5 only separators", ADT_A01.replace("DOE^JANE^Q", "^^"), ("missing_required_field", "PID-5")),
    ("empty ORC-1", ORM_O01.replace("ORC|NW|", "ORC||"), ("missing_required_field", "ORC-1")),
    ("empty OBR-4", ORM_O01.replace("24323-8^Comprehensive metabolic panel^LN", ""), ("missing_required_field", "OBR-4")),
    ("empty second OBX-3", ORU_R01 + "\rOBX|2|NM||||", ("missing_required_field", "OBX[2]-3")),
    ("empty MSH-10", ORU_R01.replace("|CTRL0001|", "||"), ("missing_required_field", "MSH-10")),
    ("A08 without EVN", ADT_A01.replace("ADT^A01^ADT_A01", "ADT^A08").replace("EVN|A01|20240501120000\r", ""), ("missing_required_field", "EVN")),
    ("unclosed escape", ORU_R01.replace("\\T\\ rerun", "\\T rerun"), ("bad_escape", "NTE-3")),
    ("unknown escape", ADT_A01.replace("DOE^JANE", "DOE\\Q\\^JANE"), ("bad_escape", "PID-5")),
    ("over-long name", ADT_A01.replace("DOE^JANE^Q", "D" * 251), ("field_too_long", "PID-5")),
    ("over-long sex", ADT_A01.replace("|F|", "|FEMALE|"), ("field_too_long", "PID-8")),
]  # fmt: skip


@pytest.mark.parametrize(("what", "message", "observed"), OBSERVED, ids=[o[0] for o in OBSERVED])
def test_odd_but_usable_messages_are_observed_not_refused(what, message, observed):
    check = check_er7(message)
    assert check.problem is None, check.problem
    assert observed in [(o.kind, o.where) for o in check.observations]


def test_observations_name_the_field_and_its_offset():
    message = ADT_A01.replace("DOE^JANE^Q", "D" * 300)
    (observation,) = check_er7(message).observations
    assert observation.detail == (
        f"PID-5 (Patient Name) is 300 characters at character offset {message.index('DDD')}, over its "
        "v2.5.1 length of 250"
    )
    escaped = ORU_R01.replace("\\T\\ rerun", "\\Zunclosed")
    (bad,) = check_er7(escaped).observations
    at = escaped.index("\\Z")
    assert (
        bad.detail == f"NTE-3 (Comment): escape sequence '\\Zunclosed' is not closed at character offset {at}"
    )


def test_valid_escape_sequences_are_not_observed():
    message = ORU_R01.replace(
        "\\T\\ rerun", "\\F\\\\S\\\\R\\\\E\\\\X0D0A\\\\.br\\\\H\\bold\\N\\\\Zlocal\\\\C2842\\"
    )
    assert check_er7(message).observations == ()


def test_a_message_with_many_z_segments_gives_one_observation_per_kind_and_place():
    message = ADT_A01 + "".join(f"\rZPD|{n}" for n in range(500))
    assert [(o.kind, o.where) for o in check_er7(message).observations] == [("z_segment", "ZPD")]


def test_decode_payload_refuses_with_the_parse_problem_and_keeps_the_observations():
    raw = (ADT_A01.replace("PID|", "P1D|") + "\rZPD|1").encode("cp1252")
    decoded = decode_payload(raw, HL7_ER7, "ADT^A01")
    assert decoded.problem_kind == "parse" and decoded.raw == raw
    assert decoded.problem.startswith("segment 3 'P1D' is not a segment name at byte offset ")
    usable = decode_payload((ADT_A01 + "\rZPD|1").encode(), HL7_ER7, "ADT^A01")
    assert usable.problem is None and [o.kind for o in usable.observations] == ["z_segment"]


# --- never raises ---------------------------------------------------------------------------------

_SEPARATORS = st.sampled_from(["|", "^", "~", "\\", "&", "\r", "\n", "\r\n", "\x0b", "\x1c", ""])


@st.composite
def mutated(draw):
    """A real message with characters replaced, inserted and deleted, segments dropped or repeated."""
    text = draw(st.sampled_from(REAL))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "drop_segment", "repeat_segment"]))
        piece = draw(st.one_of(_SEPARATORS, st.text(max_size=4)))
        if action == "insert":
            text = text[:position] + piece + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 20)) :]
        elif action == "replace":
            text = text[:position] + piece + text[position + 1 :]
        else:
            segments = text.split("\r")
            index = draw(st.integers(0, len(segments) - 1))
            if action == "drop_segment":
                segments.pop(index)
            else:
                segments.insert(index, segments[index])
            text = "\r".join(segments)
    return text


def _never_broken(text: str, **options) -> None:
    check = check_er7(text, **options)
    assert check.problem is None or "could not be checked" not in check.problem  # no internal error
    assert (check.kind is None) == (check.problem is None)
    if check.problem is None:  # python-hl7 (the viewer's and the ACK parser's) reads what we accept
        separator = read_separators(text).field
        segments = er7_segments(text)
        parsed = hl7.parse("\r".join(separator.join(value for value, _ in s.fields) for s in segments))
        assert [str(s[0]) for s in parsed] == [s.name for s in segments]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.sampled_from([None, "utf-8", "cp1252", "ADT^A08"]))
def test_arbitrary_text_never_raises(text, option):
    if option == "ADT^A08":
        _never_broken(text, message_type=option)
    else:
        _never_broken(text, encoding=option)
    _never_broken("MSH|^~\\&|" + text)


@settings(max_examples=400, deadline=None)
@given(mutated(), st.sampled_from([None, "utf-8", "latin-1"]))
def test_mutated_real_messages_never_raise(text, encoding):
    _never_broken(text, encoding=encoding)
    decoded = decode_payload(
        text.encode("utf-8", "surrogatepass"), HL7_ER7, "ORU^R01", diagnosis_code_system="icd-10"
    )
    assert (decoded.problem is None) == (decoded.problem_kind is None)
