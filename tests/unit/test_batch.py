"""Issue 5 'Batch files': splitting HL7 v2 batch files and FHIR NDJSON into messages, on bytes."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.batch import (
    FHIR_NDJSON,
    HL7_V2,
    UNKNOWN_TYPE,
    SplitReport,
    UnrecognisedFile,
    detect_format,
    hl7_message_type,
    split,
    split_hl7,
    split_ndjson,
)
from app.domain.payloads import FHIR_JSON, HL7_ER7


def msh(message_type: str, control: str = "1", *, sep: bytes = b"|", enc: bytes = b"^~\\&") -> bytes:
    return sep.join(
        [b"MSH", enc, b"RECON", b"MERCY", b"EHR", b"WARD", b"20261202101500", b"", message_type.encode()]
        + [control.encode(), b"P", b"2.5.1"]
    )


def message(message_type: str, *, name: bytes = b"DOE^JANE", term: bytes = b"\r") -> bytes:
    return term.join([msh(message_type), b"PID|1||MRN-1^^^MERCY^MR||" + name, b"PV1|1|I"]) + term


def assert_exact_slices(data: bytes, items) -> None:
    """Every item is the file's own bytes at its offset, in order, never overlapping."""
    end = 0
    for number, item in enumerate(items, start=1):
        assert item.position == number
        assert data[item.offset : item.offset + len(item.raw)] == item.raw
        assert item.offset >= end
        end = item.offset + len(item.raw)


def outside_items(data: bytes, items) -> bytes:
    """The file's bytes that belong to no item."""
    out, end = [], 0
    for item in items:
        out.append(data[end : item.offset])
        end = item.offset + len(item.raw)
    out.append(data[end:])
    return b"".join(out)


def only_envelope(rest: bytes, framed: bool) -> bool:
    """True when `rest` holds nothing but a BOM, blank lines, MLLP framing and FHS/BHS/BTS/FTS."""
    rest = rest.removeprefix(b"\xef\xbb\xbf")
    for piece in re.split(rb"\r\n|\r|\n|\x0b|\x1c" if framed else rb"\r\n|\r|\n", rest):
        piece = piece.lstrip(b" \t")
        if not piece.strip(b" \t"):
            continue
        if piece[:3] not in (b"FHS", b"BHS", b"BTS", b"FTS") or piece[3:4].isalnum():
            return False
    return True


# --- HL7 v2 -------------------------------------------------------------------------------------


def test_fhs_bhs_bts_fts_envelopes_with_two_batches():
    a, b, c = message("ADT^A08"), message("ORU^R01"), message("SIU^S12")
    data = (
        b"FHS|^~\\&|RECON|MERCY\rBHS|^~\\&|RECON|MERCY\r"
        + a
        + b
        + b"BTS|2\rBHS|^~\\&|RECON|MERCY\r"
        + c
        + b"BTS|1\rFTS|2\r"
    )
    report, items = split(data)
    assert report.format == HL7_V2 and report.content_type == HL7_ER7
    assert [i.raw for i in items] == [a, b, c]
    assert [i.message_type for i in items] == ["ADT^A08", "ORU^R01", "SIU^S12"]
    assert [i.position for i in items] == [1, 2, 3]
    assert items[0].offset == data.index(b"MSH")
    assert (report.batches, report.file_headers, report.messages) == (2, 1, 3)
    assert report.warnings == []
    assert report.describe() == "HL7 v2 batch, 2 batches"
    assert only_envelope(outside_items(data, items), framed=False)


def test_bare_concatenated_messages_with_crlf_terminators():
    a, b = message("ADT^A01", term=b"\r\n"), message("ADT^A04", term=b"\r\n")
    data = a + b"\r\n" + b
    report, items = split(data)
    assert [i.raw for i in items] == [a, b]  # the terminators are the file's own, kept
    assert [i.offset for i in items] == [0, len(a) + 2]
    assert report.describe() == "HL7 v2, bare messages" and report.warnings == []


def test_lf_terminated_messages_and_a_last_segment_without_terminator():
    a = message("ORM^O01", term=b"\n")
    b = b"MSH|^~\\&|A|B|C|D|20261202||ORU^R01|9|P|2.5\nOBX|1|ST|X||y"
    _, items = split(a + b)
    assert [i.raw for i in items] == [a, b]
    assert [i.message_type for i in items] == ["ORM^O01", "ORU^R01"]


def test_mllp_framed_file_without_the_framing_bytes():
    a, b = message("ADT^A08"), message("ADT^A01").rstrip(b"\r")
    data = b"\x0b" + a + b"\x1c\r\x0b" + b + b"\x1c\r"
    report, items = split(data)
    assert report.mllp_framed and report.describe() == "HL7 v2, MLLP-framed"
    assert [i.raw for i in items] == [a, b]
    assert [i.offset for i in items] == [1, len(a) + 4]


def test_cp1252_and_latin1_bytes_are_kept_byte_for_byte():
    cp1252 = message("ADT^A08", name="NUÑEZ – JR^MARÍA".encode("cp1252"))
    latin1 = message("ADT^A08", name="MÜLLER^JÖRG".encode("latin-1"))
    assert b"\x96" in cp1252  # the cp1252 en dash: not UTF-8, not even Latin-1 text
    _, items = split(b"BHS|^~\\&\r" + cp1252 + latin1 + b"BTS|2\r")
    assert [i.raw for i in items] == [cp1252, latin1]


def test_a_bts_count_that_differs_is_a_warning_not_a_failure():
    data = b"BHS|^~\\&\r" + message("ADT^A08") + message("ADT^A08") + b"BTS|3\r"
    report, items = split(data)
    assert len(items) == 2
    assert report.warnings == ["batch 1 (BHS at byte 0): BTS-1 says 3 message(s), 2 found"]


def test_a_batch_without_bts_and_an_fts_count_that_differs_are_warned():
    data = b"FHS|^~\\&\rBHS|^~\\&\r" + message("ADT^A08") + b"BHS|^~\\&\r" + message("ADT^A04") + b"FTS|1\r"
    report, items = split(data)
    assert len(items) == 2 and report.batches == 2
    assert any("batch 1" in w and "has no BTS" in w for w in report.warnings)
    assert any("batch 2" in w and "has no BTS" in w for w in report.warnings)
    assert any("FTS-1 says 1 batch(es), 2 found" in w for w in report.warnings)


def test_segments_outside_any_message_are_kept_as_items_not_dropped():
    a = message("ADT^A08")
    data = b"BHS|^~\\&\rZZZ|stray|\xe9\rNTE|1\r" + a + b"BTS|1\r"
    report, items = split(data)
    assert [i.raw for i in items] == [b"ZZZ|stray|\xe9\rNTE|1\r", a]
    assert items[0].message_type == UNKNOWN_TYPE and items[1].message_type == "ADT^A08"
    assert report.stray_runs == 1 and report.messages == 1
    assert report.warnings == ["1 run(s) of segments outside any message (no MSH) kept as items"]


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        (msh("ADT^A08^ADT_A01"), "ADT^A08"),
        (msh("ADT"), "ADT"),
        (msh("ADT$A08", enc=b"$~\\&"), "ADT^A08"),  # the file's own component separator
        (msh("ADT^A08", sep=b"#"), "ADT^A08"),
        (msh("ADT^A08~ADT^A04"), "ADT^A08"),  # the first repetition
        (msh(" ORU ^ R01-X "), "ORU^R01-X"),
        (msh(""), UNKNOWN_TYPE),
        (b"MSH|^~\\&|A|B", UNKNOWN_TYPE),
        (msh("ADÉ^A08"), UNKNOWN_TYPE),
        (b"MSH", UNKNOWN_TYPE),
    ],
)
def test_message_type_is_msh_9_code_and_event(segment, expected):
    assert hl7_message_type(segment) == expected


# --- FHIR NDJSON --------------------------------------------------------------------------------


def test_ndjson_skips_blank_lines_and_keeps_broken_ones():
    patient = json.dumps({"resourceType": "Patient", "id": "p1", "name": [{"family": "Nguyễn"}]}).encode()
    obs = b'{"resourceType": "Observation", "status": "final"}'
    broken = b'{"resourceType": "Observation", "status": '
    data = patient + b"\r\n\r\n   \n" + b"not json at all \xff\n" + broken + b"\n" + obs + b"\n\n"
    report, items = split(data)
    assert report.format == FHIR_NDJSON and report.content_type == FHIR_JSON
    assert [i.raw for i in items] == [patient, b"not json at all \xff", broken, obs]
    assert [i.message_type for i in items] == ["Patient", UNKNOWN_TYPE, UNKNOWN_TYPE, "Observation"]
    assert [i.position for i in items] == [1, 2, 3, 4]
    assert_exact_slices(data, items)
    assert report.describe() == "FHIR NDJSON"


def test_ndjson_after_a_bom_and_odd_resource_types():
    data = b'\xef\xbb\xbf{"resourceType": "Patient"}\n{"resourceType": 7}\n[1, 2]\n{"resourceType": "a b"}'
    _, items = split(data)
    assert items[0].raw == b'{"resourceType": "Patient"}' and items[0].offset == 3
    assert [i.message_type for i in items] == ["Patient", UNKNOWN_TYPE, UNKNOWN_TYPE, UNKNOWN_TYPE]


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"  \r\n{}", FHIR_NDJSON),
        (b"FHS|^~\\&", HL7_V2),
        (b"\nBHS|^~\\&", HL7_V2),
        (b"MSH|^~\\&", HL7_V2),
        (b"\x0bMSH|^~\\&", HL7_V2),
        (b"\xef\xbb\xbfMSH|", HL7_V2),
        (b"PID|1", None),
        (b"<xml/>", None),
        (b"", None),
    ],
)
def test_format_is_detected_from_content(data, expected):
    assert detect_format(data) == expected


@pytest.mark.parametrize("data", [b"", b" \r\n\t ", b"hello", b"PID|1||x\r", b"\x00\x01"])
def test_unrecognised_or_empty_files_are_a_clear_error(data):
    with pytest.raises(UnrecognisedFile) as info:
        split(data)
    assert "empty" in info.value.message or "not an HL7 v2 batch file" in info.value.message


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(data):
    assert_exact_slices(data, list(split_ndjson(data)))
    report = SplitReport(HL7_V2)
    items = list(split_hl7(data, report))
    assert_exact_slices(data, items)
    assert only_envelope(outside_items(data, items), report.mllp_framed)
    try:
        report, items = split(data)
    except UnrecognisedFile:
        assert detect_format(data) is None
    else:
        assert report.format == detect_format(data)


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_after_an_msh_never_raise_and_nothing_is_dropped(tail):
    data = b"MSH|^~\\&|" + tail
    items = list(split_hl7(data))
    assert_exact_slices(data, items)
    assert only_envelope(outside_items(data, items), framed=False)


field_bytes = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"\r\n\x0b\x1c|^~\\&"))
message_types = st.sampled_from(["ADT^A01", "ADT^A08", "ORM^O01", "ORU^R01", "SIU^S12", "MDM^T02"])


@st.composite
def hl7_files(draw):
    """(file bytes, the messages in it, their types, framed) for a random envelope layout."""
    term = draw(st.sampled_from([b"\r", b"\n", b"\r\n"]))
    framed = draw(st.booleans())
    enveloped = not framed and draw(st.booleans())
    batches = draw(
        st.lists(st.lists(st.tuples(message_types, field_bytes), max_size=4), min_size=1, max_size=3)
    )
    messages, types, parts = [], [], []
    if enveloped:
        parts.append(b"FHS|^~\\&|X" + term)
    for batch in batches:
        if enveloped:
            parts.append(b"BHS|^~\\&|X" + term + draw(st.sampled_from([b"", term])))
        for message_type, name in batch:
            body = message(message_type, name=name, term=term)
            messages.append(body)
            types.append(message_type)
            parts.append(b"\x0b" + body + b"\x1c\r" if framed else body)
            if not framed and draw(st.booleans()):
                parts.append(term)  # a blank line between messages
        if enveloped:
            parts.append(f"BTS|{len(batch)}".encode() + term)
    if enveloped:
        parts.append(f"FTS|{len(batches)}".encode() + term)
    return b"".join(parts), messages, types, framed, enveloped


@given(hl7_files())
def test_items_plus_envelope_cover_every_message_of_the_file(case):
    data, messages, types, framed, enveloped = case
    if not messages and not enveloped:
        return  # an empty file: not a batch file at all
    report, items = split(data)
    assert [i.raw for i in items] == messages
    assert [i.message_type for i in items] == types
    assert_exact_slices(data, items)
    assert only_envelope(outside_items(data, items), framed)
    assert report.warnings == []  # the BTS/FTS counts match what was built
    assert report.mllp_framed == framed


@given(st.lists(st.one_of(st.binary(max_size=60), st.sampled_from([b"", b"  ", b"\r"])), max_size=20))
def test_ndjson_items_are_exactly_the_non_blank_lines(lines):
    lines = [line.replace(b"\n", b"") for line in lines]
    data = b"\n".join([b'{"resourceType":"Patient"}', *lines])
    _, items = split(data)
    expected = [b'{"resourceType":"Patient"}'] + [
        line.removesuffix(b"\r") for line in lines if line.strip(b" \t\r\n")
    ]
    assert [i.raw for i in items] == expected
    assert_exact_slices(data, items)
