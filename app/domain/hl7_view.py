"""HL7 v2 as reviewers read it: segments as rows, fields numbered and named (`PID-5 Patient
Name`), components split, and the fields an issue names (ERR-2 `PID^1^7`, `PID-7`) flagged.
Pure functions over text, in the domain: the console only renders them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Field names of the segments reviewers meet most (HL7 v2.5.1).
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "MSH": (
        "Field Separator",
        "Encoding Characters",
        "Sending Application",
        "Sending Facility",
        "Receiving Application",
        "Receiving Facility",
        "Date/Time of Message",
        "Security",
        "Message Type",
        "Message Control ID",
        "Processing ID",
        "Version ID",
        "Sequence Number",
        "Continuation Pointer",
        "Accept Acknowledgment Type",
        "Application Acknowledgment Type",
        "Country Code",
        "Character Set",
        "Principal Language of Message",
    ),
    "EVN": (
        "Event Type Code",
        "Recorded Date/Time",
        "Date/Time Planned Event",
        "Event Reason Code",
        "Operator ID",
        "Event Occurred",
        "Event Facility",
    ),
    "PID": (
        "Set ID",
        "Patient ID",
        "Patient Identifier List",
        "Alternate Patient ID",
        "Patient Name",
        "Mother's Maiden Name",
        "Date/Time of Birth",
        "Administrative Sex",
        "Patient Alias",
        "Race",
        "Patient Address",
        "County Code",
        "Phone Number - Home",
        "Phone Number - Business",
        "Primary Language",
        "Marital Status",
        "Religion",
        "Patient Account Number",
        "SSN Number",
        "Driver's License Number",
        "Mother's Identifier",
        "Ethnic Group",
        "Birth Place",
        "Multiple Birth Indicator",
        "Birth Order",
        "Citizenship",
        "Veterans Military Status",
        "Nationality",
        "Patient Death Date and Time",
        "Patient Death Indicator",
    ),
    "PV1": (
        "Set ID",
        "Patient Class",
        "Assigned Patient Location",
        "Admission Type",
        "Preadmit Number",
        "Prior Patient Location",
        "Attending Doctor",
        "Referring Doctor",
        "Consulting Doctor",
        "Hospital Service",
        "Temporary Location",
        "Preadmit Test Indicator",
        "Re-admission Indicator",
        "Admit Source",
        "Ambulatory Status",
        "VIP Indicator",
        "Admitting Doctor",
        "Patient Type",
        "Visit Number",
    ),
    "ORC": (
        "Order Control",
        "Placer Order Number",
        "Filler Order Number",
        "Placer Group Number",
        "Order Status",
        "Response Flag",
        "Quantity/Timing",
        "Parent",
        "Date/Time of Transaction",
        "Entered By",
        "Verified By",
        "Ordering Provider",
        "Enterer's Location",
        "Call Back Phone Number",
        "Order Effective Date/Time",
        "Order Control Code Reason",
    ),
    "OBR": (
        "Set ID",
        "Placer Order Number",
        "Filler Order Number",
        "Universal Service Identifier",
        "Priority",
        "Requested Date/Time",
        "Observation Date/Time",
        "Observation End Date/Time",
        "Collection Volume",
        "Collector Identifier",
        "Specimen Action Code",
        "Danger Code",
        "Relevant Clinical Information",
        "Specimen Received Date/Time",
        "Specimen Source",
        "Ordering Provider",
        "Order Callback Phone Number",
        "Placer Field 1",
        "Placer Field 2",
        "Filler Field 1",
        "Filler Field 2",
        "Results Rpt/Status Chng - Date/Time",
        "Charge to Practice",
        "Diagnostic Serv Sect ID",
        "Result Status",
    ),
    "OBX": (
        "Set ID",
        "Value Type",
        "Observation Identifier",
        "Observation Sub-ID",
        "Observation Value",
        "Units",
        "References Range",
        "Abnormal Flags",
        "Probability",
        "Nature of Abnormal Test",
        "Observation Result Status",
        "Effective Date of Reference Range",
        "User Defined Access Checks",
        "Date/Time of the Observation",
        "Producer's ID",
        "Responsible Observer",
        "Observation Method",
    ),
    "NTE": ("Set ID", "Source of Comment", "Comment", "Comment Type"),
    "MSA": (
        "Acknowledgment Code",
        "Message Control ID",
        "Text Message",
        "Expected Sequence Number",
        "Delayed Acknowledgment Type",
        "Error Condition",
    ),
    "ERR": (
        "Error Code and Location",
        "Error Location",
        "HL7 Error Code",
        "Severity",
        "Application Error Code",
        "Application Error Parameter",
        "Diagnostic Information",
        "User Message",
    ),
    "RXO": (
        "Requested Give Code",
        "Requested Give Amount - Minimum",
        "Requested Give Amount - Maximum",
        "Requested Give Units",
        "Requested Dosage Form",
        "Provider's Pharmacy/Treatment Instructions",
        "Provider's Administration Instructions",
    ),
    "RXE": (
        "Quantity/Timing",
        "Give Code",
        "Give Amount - Minimum",
        "Give Amount - Maximum",
        "Give Units",
        "Give Dosage Form",
        "Provider's Administration Instructions",
    ),
    "AL1": (
        "Set ID",
        "Allergen Type Code",
        "Allergen Code/Mnemonic/Description",
        "Allergy Severity Code",
        "Allergy Reaction Code",
        "Identification Date",
    ),
    "DG1": (
        "Set ID",
        "Diagnosis Coding Method",
        "Diagnosis Code",
        "Diagnosis Description",
        "Diagnosis Date/Time",
        "Diagnosis Type",
    ),
}

_LOCATION_DASH = re.compile(r"\b([A-Z][A-Z0-9]{2})-(\d+)")
_LOCATION_CARET = re.compile(r"\b([A-Z][A-Z0-9]{2})\^\d*\^(\d+)")


@dataclass
class Hl7Field:
    number: int
    name: str
    value: str
    components: list[str]
    issues: list[int] = field(default_factory=list)


@dataclass
class Hl7Segment:
    name: str
    position: int  # 1-based line number in the message
    fields: list[Hl7Field]

    @property
    def flagged(self) -> bool:
        return any(f.issues for f in self.fields)


def _hl7_locations(issue: dict) -> set[tuple[str, int]]:
    texts = [str(e) for e in issue.get("expression") or []]
    if issue.get("location"):
        texts.append(str(issue["location"]))
    found = set()
    for text in texts:
        found |= {(s, int(n)) for s, n in _LOCATION_DASH.findall(text)}
        found |= {(s, int(n)) for s, n in _LOCATION_CARET.findall(text)}
    return found


def hl7_segments(text: str, issues: list[dict]) -> list[Hl7Segment]:
    """Split an ER7 message into segments and numbered fields (MSH-1 is the separator itself)."""
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    separator = lines[0][3] if lines and lines[0].startswith("MSH") and len(lines[0]) > 3 else "|"
    component = lines[0][4] if lines and lines[0].startswith("MSH") and len(lines[0]) > 4 else "^"
    locations = {n: _hl7_locations(issue) for n, issue in enumerate(issues, start=1)}
    segments = []
    for position, line in enumerate(lines, start=1):
        name = line[:3]
        parts = line.split(separator)
        if name == "MSH":
            numbered = [(1, separator)] + [(i + 1, parts[i]) for i in range(1, len(parts))]
        else:
            numbered = [(i, parts[i]) for i in range(1, len(parts))]
        names = FIELD_NAMES.get(name, ())
        fields = []
        for number, value in numbered:
            if value == "":
                continue
            components = value.split(component) if name != "MSH" or number > 2 else [value]
            hits = [n for n, locs in locations.items() if (name, number) in locs]
            fields.append(
                Hl7Field(number, names[number - 1] if number <= len(names) else "", value, components, hits)
            )
        segments.append(Hl7Segment(name, position, fields))
    return segments
