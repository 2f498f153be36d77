"""Payload viewers: FHIR JSON with OperationOutcome issues highlighted, HL7 v2 as a field table.

Pure functions over text; the caller decides whether the viewer may see the payload (and audits it).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

_INDEX = re.compile(r"\[\d+\]")


# --- FHIR -----------------------------------------------------------------------------------------


@dataclass
class JsonLine:
    text: str
    path: str  # FHIRPath-like location of the value on this line, e.g. Patient.name[0].given[1]
    issues: list[int] = field(default_factory=list)  # 1-based numbers of the issues that point here


def _emit(value, path: str, depth: int, prefix: str, comma: str, out: list[JsonLine]) -> None:
    pad = "  " * depth
    if isinstance(value, dict) and value:
        out.append(JsonLine(f"{pad}{prefix}{{", path))
        items = list(value.items())
        for i, (key, child) in enumerate(items):
            _emit(
                child,
                f"{path}.{key}",
                depth + 1,
                json.dumps(key) + ": ",
                "," if i < len(items) - 1 else "",
                out,
            )
        out.append(JsonLine(f"{pad}}}{comma}", path))
    elif isinstance(value, list) and value:
        out.append(JsonLine(f"{pad}{prefix}[", path))
        for i, child in enumerate(value):
            _emit(child, f"{path}[{i}]", depth + 1, "", "," if i < len(value) - 1 else "", out)
        out.append(JsonLine(f"{pad}]{comma}", path))
    else:
        out.append(JsonLine(f"{pad}{prefix}{json.dumps(value, ensure_ascii=False)}{comma}", path))


def _normalise_expression(expression: str) -> str:
    # FHIRPath functions (".where(...)", ".exists()") narrow the location; the part before is enough.
    expression = expression.strip()
    cut = expression.find("(")
    if cut != -1:
        expression = expression[:cut].rsplit(".", 1)[0]
    return expression


def _points_at(path: str, expression: str) -> bool:
    for p, e in ((path, expression), (_INDEX.sub("", path), _INDEX.sub("", expression))):
        if p == e or p.startswith(e + ".") or p.startswith(e + "["):
            return True
    return False


def fhir_lines(text: str, issues: list[dict]) -> list[JsonLine] | None:
    """Pretty-printed JSON lines with the issues whose `expression` points at them; None if not JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    root = doc.get("resourceType", "$") if isinstance(doc, dict) else "$"
    lines: list[JsonLine] = []
    _emit(doc, str(root), 0, "", "", lines)
    for number, issue in enumerate(issues, start=1):
        for expression in issue.get("expression") or []:
            expression = _normalise_expression(str(expression))
            if not expression:
                continue
            for line in lines:
                if _points_at(line.path, expression) and number not in line.issues:
                    line.issues.append(number)
    return lines


# --- HL7 v2 ---------------------------------------------------------------------------------------

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


# --- corrections ----------------------------------------------------------------------------------


@dataclass
class DiffLine:
    kind: str  # add | del | hunk | file | same
    text: str


def payload_diff(
    original: str, corrected: str, *, original_label: str = "version 1 (original)"
) -> list[DiffLine]:
    """Unified diff of a corrected payload against the original, line by line for the template."""
    lines = []
    for text in difflib.unified_diff(
        original.splitlines(),
        corrected.splitlines(),
        fromfile=original_label,
        tofile="corrected",
        lineterm="",
    ):
        if text.startswith(("---", "+++")):
            kind = "file"
        elif text.startswith("@@"):
            kind = "hunk"
        elif text.startswith("+"):
            kind = "add"
        elif text.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        lines.append(DiffLine(kind, text))
    return lines


def normalise_edited(text: str, content_type: str) -> str:
    """Browsers submit textareas with CRLF; HL7 v2 separates segments with CR only."""
    lines = text.splitlines()
    if content_type == "x-application/hl7-v2+er7":
        return "\r".join(lines)
    return "\n".join(lines)


def editable_text(text: str) -> str:
    """Payload text as a textarea shows it (one HL7 segment per line)."""
    return "\n".join(text.splitlines())
