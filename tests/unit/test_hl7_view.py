"""The HL7 v2 field table (app/domain/hl7_view.py): numbered, named fields; the field an ACK's ERR
segment names (as the MLLP adapter records it) is flagged."""

from app.domain.hl7 import ack_outcome
from app.domain.hl7_view import hl7_segments

MESSAGE = (
    "MSH|^~\\&|RECON|MERCY|EHR|LAB|20261202||ADT^A08|C1|P|2.5.1\r"
    "PID|1||MRN-00042^^^MERCY^MR||NUÑEZ^MARÍA||\r"
    "PV1|1|I"
)


def test_fields_are_numbered_and_named_and_msh1_is_the_separator():
    msh, pid, _ = hl7_segments(MESSAGE, [])
    assert (msh.fields[0].number, msh.fields[0].value) == (1, "|")
    assert [f.number for f in msh.fields][-1] == 12
    name = next(f for f in pid.fields if f.number == 5)
    assert name.name == "Patient Name" and name.components == ["NUÑEZ", "MARÍA"]


def test_the_field_an_err_segment_names_is_flagged():
    ack = "MSH|^~\\&|EHR|LAB|RECON|MERCY|20261202||ACK^A08|A1|P|2.5.1\rMSA|AE|C1\rERR||PID^1^7|101|E"
    issues = ack_outcome(ack, "C1").issues
    segments = hl7_segments(MESSAGE.replace("MARÍA||", "MARÍA||X"), issues)
    pid = segments[1]
    assert pid.flagged and [f.number for f in pid.fields if f.issues] == [7]
