"""HL7 v2 as reviewers read it: segments as rows, fields numbered and named (`PID-5 Patient Name`),
repetitions (`~`), components (`^`) and subcomponents (`&`) split, the fields a problem names
flagged, and the raw text with its control characters made visible.

Parsed with python-hl7; what it cannot parse is split by hand, so viewing never raises. Where a
problem is: an ERR-2 location (`PID^1^7`, sequence-aware), a field written as `PID-7` or `PID-5.2`
in an issue or in the exception's detail, and a byte offset (`at offset 120`, `byte 37`) whose
segment, and field where it falls inside one, are flagged.

Masked views (roles without PHI access) keep the structure and replace every value of a field not
on an allow-list with MASK: deny by default, so Z-segments and segments we do not know stay masked.
Pure functions over text, in the domain: the console only renders them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MASK = "•••"
MAX_SEGMENTS = 1000  # a batch file can hold thousands; the raw view still shows everything
HEADER_SEGMENTS = (
    "MSH",
    "FHS",
    "BHS",
)  # field 1 is the field separator itself, field 2 the encoding characters
SITE_DEFINED = "site-defined"

SEGMENT_NAMES: dict[str, str] = {
    "MSH": "Message Header",
    "FHS": "File Header",
    "FTS": "File Trailer",
    "BHS": "Batch Header",
    "BTS": "Batch Trailer",
    "EVN": "Event Type",
    "PID": "Patient Identification",
    "PD1": "Patient Additional Demographic",
    "NK1": "Next of Kin / Associated Parties",
    "PV1": "Patient Visit",
    "PV2": "Patient Visit - Additional Information",
    "MRG": "Merge Patient Information",
    "IN1": "Insurance",
    "GT1": "Guarantor",
    "AL1": "Patient Allergy Information",
    "DG1": "Diagnosis",
    "ORC": "Common Order",
    "OBR": "Observation Request",
    "OBX": "Observation/Result",
    "NTE": "Notes and Comments",
    "SPM": "Specimen",
    "RXO": "Pharmacy/Treatment Order",
    "RXE": "Pharmacy/Treatment Encoded Order",
    "SCH": "Scheduling Activity Information",
    "TQ1": "Timing/Quantity",
    "RGS": "Resource Group",
    "AIS": "Appointment Information",
    "AIL": "Appointment Information - Location Resource",
    "AIP": "Appointment Information - Personnel Resource",
    "MSA": "Message Acknowledgment",
    "ERR": "Error",
}

_FILE_HEADER = (
    "Field Separator",
    "Encoding Characters",
    "Sending Application",
    "Sending Facility",
    "Receiving Application",
    "Receiving Facility",
    "Creation Date/Time",
    "Security",
    "Name/ID/Type",
    "Comment",
    "Control ID",
    "Reference Control ID",
)

# Field names, HL7 v2.5.1 (position n is FIELD_NAMES[segment][n - 1]).
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
        "Alternate Character Set Handling Scheme",
        "Message Profile Identifier",
    ),
    "FHS": _FILE_HEADER,
    "BHS": _FILE_HEADER,
    "FTS": ("File Batch Count", "File Trailer Comment"),
    "BTS": ("Batch Message Count", "Batch Comment", "Batch Totals"),
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
        "SSN Number - Patient",
        "Driver's License Number - Patient",
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
        "Identity Unknown Indicator",
        "Identity Reliability Code",
        "Last Update Date/Time",
        "Last Update Facility",
        "Species Code",
        "Breed Code",
        "Strain",
        "Production Class Code",
        "Tribal Citizenship",
    ),
    "NK1": (
        "Set ID",
        "Name",
        "Relationship",
        "Address",
        "Phone Number",
        "Business Phone Number",
        "Contact Role",
        "Start Date",
        "End Date",
        "Next of Kin / Associated Parties Job Title",
        "Next of Kin / Associated Parties Job Code/Class",
        "Next of Kin / Associated Parties Employee Number",
        "Organization Name",
        "Marital Status",
        "Administrative Sex",
        "Date/Time of Birth",
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
        "Financial Class",
        "Charge Price Indicator",
        "Courtesy Code",
        "Credit Rating",
        "Contract Code",
        "Contract Effective Date",
        "Contract Amount",
        "Contract Period",
        "Interest Code",
        "Transfer to Bad Debt Code",
        "Transfer to Bad Debt Date",
        "Bad Debt Agency Code",
        "Bad Debt Transfer Amount",
        "Bad Debt Recovery Amount",
        "Delete Account Indicator",
        "Delete Account Date",
        "Discharge Disposition",
        "Discharged to Location",
        "Diet Type",
        "Servicing Facility",
        "Bed Status",
        "Account Status",
        "Pending Location",
        "Prior Temporary Location",
        "Admit Date/Time",
        "Discharge Date/Time",
        "Current Patient Balance",
        "Total Charges",
        "Total Adjustments",
        "Total Payments",
        "Alternate Visit ID",
        "Visit Indicator",
        "Other Healthcare Provider",
    ),
    "MRG": (
        "Prior Patient Identifier List",
        "Prior Alternate Patient ID",
        "Prior Patient Account Number",
        "Prior Patient ID",
        "Prior Visit Number",
        "Prior Alternate Visit ID",
        "Prior Patient Name",
    ),
    "IN1": (
        "Set ID",
        "Insurance Plan ID",
        "Insurance Company ID",
        "Insurance Company Name",
        "Insurance Company Address",
        "Insurance Co Contact Person",
        "Insurance Co Phone Number",
        "Group Number",
        "Group Name",
        "Insured's Group Emp ID",
        "Insured's Group Emp Name",
        "Plan Effective Date",
        "Plan Expiration Date",
        "Authorization Information",
        "Plan Type",
        "Name of Insured",
        "Insured's Relationship to Patient",
        "Insured's Date of Birth",
        "Insured's Address",
        "Assignment of Benefits",
        "Coordination of Benefits",
        "Coord of Ben. Priority",
        "Notice of Admission Flag",
        "Notice of Admission Date",
        "Report of Eligibility Flag",
        "Report of Eligibility Date",
        "Release Information Code",
        "Pre-Admit Cert (PAC)",
        "Verification Date/Time",
        "Verification By",
        "Type of Agreement Code",
        "Billing Status",
        "Lifetime Reserve Days",
        "Delay Before L.R. Day",
        "Company Plan Code",
        "Policy Number",
        "Policy Deductible",
        "Policy Limit - Amount",
        "Policy Limit - Days",
        "Room Rate - Semi-Private",
        "Room Rate - Private",
        "Insured's Employment Status",
        "Insured's Administrative Sex",
        "Insured's Employer's Address",
        "Verification Status",
        "Prior Insurance Plan ID",
        "Coverage Type",
        "Handicap",
        "Insured's ID Number",
        "Signature Code",
        "Signature Code Date",
        "Insured's Birth Place",
        "VIP Indicator",
    ),
    "GT1": (
        "Set ID",
        "Guarantor Number",
        "Guarantor Name",
        "Guarantor Spouse Name",
        "Guarantor Address",
        "Guarantor Ph Num - Home",
        "Guarantor Ph Num - Business",
        "Guarantor Date/Time of Birth",
        "Guarantor Administrative Sex",
        "Guarantor Type",
        "Guarantor Relationship",
        "Guarantor SSN",
        "Guarantor Date - Begin",
        "Guarantor Date - End",
        "Guarantor Priority",
        "Guarantor Employer Name",
        "Guarantor Employer Address",
        "Guarantor Employer Phone Number",
        "Guarantor Employee ID Number",
        "Guarantor Employment Status",
        "Guarantor Organization Name",
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
        "Entering Organization",
        "Entering Device",
        "Action By",
        "Advanced Beneficiary Notice Code",
        "Ordering Facility Name",
        "Ordering Facility Address",
        "Ordering Facility Phone Number",
        "Ordering Provider Address",
        "Order Status Modifier",
        "Advanced Beneficiary Notice Override Reason",
        "Filler's Expected Availability Date/Time",
        "Confidentiality Code",
        "Order Type",
        "Enterer Authorization Mode",
        "Parent Universal Service Identifier",
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
        "Parent Result",
        "Quantity/Timing",
        "Result Copies To",
        "Parent",
        "Transportation Mode",
        "Reason for Study",
        "Principal Result Interpreter",
        "Assistant Result Interpreter",
        "Technician",
        "Transcriptionist",
        "Scheduled Date/Time",
        "Number of Sample Containers",
        "Transport Logistics of Collected Sample",
        "Collector's Comment",
        "Transport Arrangement Responsibility",
        "Transport Arranged",
        "Escort Required",
        "Planned Patient Transport Comment",
        "Procedure Code",
        "Procedure Code Modifier",
        "Placer Supplemental Service Information",
        "Filler Supplemental Service Information",
        "Medically Necessary Duplicate Procedure Reason",
        "Result Handling",
        "Parent Universal Service Identifier",
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
        "Equipment Instance Identifier",
        "Date/Time of the Analysis",
    ),
    "NTE": ("Set ID", "Source of Comment", "Comment", "Comment Type"),
    "SPM": (
        "Set ID",
        "Specimen ID",
        "Specimen Parent IDs",
        "Specimen Type",
        "Specimen Type Modifier",
        "Specimen Additives",
        "Specimen Collection Method",
        "Specimen Source Site",
        "Specimen Source Site Modifier",
        "Specimen Collection Site",
        "Specimen Role",
        "Specimen Collection Amount",
        "Grouped Specimen Count",
        "Specimen Description",
        "Specimen Handling Code",
        "Specimen Risk Code",
        "Specimen Collection Date/Time",
        "Specimen Received Date/Time",
        "Specimen Expiration Date/Time",
        "Specimen Availability",
        "Specimen Reject Reason",
        "Specimen Quality",
        "Specimen Appropriateness",
        "Specimen Condition",
        "Specimen Current Quantity",
        "Number of Specimen Containers",
        "Container Type",
        "Container Condition",
        "Specimen Child Role",
    ),
    "SCH": (
        "Placer Appointment ID",
        "Filler Appointment ID",
        "Occurrence Number",
        "Placer Group Number",
        "Schedule ID",
        "Event Reason",
        "Appointment Reason",
        "Appointment Type",
        "Appointment Duration",
        "Appointment Duration Units",
        "Appointment Timing Quantity",
        "Placer Contact Person",
        "Placer Contact Phone Number",
        "Placer Contact Address",
        "Placer Contact Location",
        "Filler Contact Person",
        "Filler Contact Phone Number",
        "Filler Contact Address",
        "Filler Contact Location",
        "Entered By Person",
        "Entered By Phone Number",
        "Entered By Location",
        "Parent Placer Appointment ID",
        "Parent Filler Appointment ID",
        "Filler Status Code",
        "Placer Order Number",
        "Filler Order Number",
    ),
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
        "Inform Person Indicator",
        "Override Type",
        "Override Reason Code",
        "Help Desk Contact Point",
    ),
    "RXO": (
        "Requested Give Code",
        "Requested Give Amount - Minimum",
        "Requested Give Amount - Maximum",
        "Requested Give Units",
        "Requested Dosage Form",
        "Provider's Pharmacy/Treatment Instructions",
        "Provider's Administration Instructions",
        "Deliver-To Location",
        "Allow Substitutions",
        "Requested Dispense Code",
        "Requested Dispense Amount",
        "Requested Dispense Units",
        "Number of Refills",
    ),
    "RXE": (
        "Quantity/Timing",
        "Give Code",
        "Give Amount - Minimum",
        "Give Amount - Maximum",
        "Give Units",
        "Give Dosage Form",
        "Provider's Administration Instructions",
        "Deliver-To Location",
        "Substitution Status",
        "Dispense Amount",
        "Dispense Units",
        "Number of Refills",
        "Ordering Provider's DEA Number",
        "Pharmacist/Treatment Supplier's Verifier ID",
        "Prescription Number",
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
        "Major Diagnostic Category",
        "Diagnostic Related Group",
        "DRG Approval Indicator",
        "DRG Grouper Review Code",
        "Outlier Type",
        "Outlier Days",
        "Outlier Cost",
        "Grouper Version and Type",
        "Diagnosis Priority",
        "Diagnosing Clinician",
        "Diagnosis Classification",
        "Confidential Indicator",
        "Attestation Date/Time",
        "Diagnosis Identifier",
        "Diagnosis Action Code",
    ),
}

# Fields a role without PHI access may read: message plumbing, event and order codes, set ids.
# Everything else — every field of PID, NK1, GT1, IN1, MRG, every Z-segment, every segment not
# listed — is masked. Deny by default: a new segment stays masked until someone adds it here.
VISIBLE_WHEN_MASKED: dict[str, frozenset[int]] = {
    "MSH": frozenset(range(1, 22)),
    "FHS": frozenset({1, 2, 3, 4, 5, 6, 7, 9, 11}),
    "BHS": frozenset({1, 2, 3, 4, 5, 6, 7, 9, 11}),
    "FTS": frozenset({1}),
    "BTS": frozenset({1}),
    "EVN": frozenset({1, 2, 4}),
    "MSA": frozenset({1, 2, 4, 5, 6}),
    "ERR": frozenset({1, 2, 3, 4, 5}),
    "PID": frozenset({1}),
    "NK1": frozenset({1}),
    "GT1": frozenset({1}),
    "IN1": frozenset({1}),
    "AL1": frozenset({1, 2}),
    "DG1": frozenset({1, 2, 6}),
    "PV1": frozenset({1, 2, 4, 10, 14, 18}),
    "ORC": frozenset({1, 5, 6}),
    "OBR": frozenset({1, 4, 5, 24, 25}),
    "OBX": frozenset({1, 2, 3, 4, 6, 11}),
    "NTE": frozenset({1, 2, 4}),
    "SPM": frozenset({1, 4, 11}),
    "SCH": frozenset({8, 25}),
}

# `PID-7`, `PID-5.2`, `PID-3.4.1` — how people and interface engines write a location.
_LOCATION_DASH = re.compile(r"\b([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,3}))?(?:\.(\d{1,3}))?")
# ERR-2 (ERL: segment^sequence^field^repetition^component^subcomponent), also v2.3 ERR-1 (ELD).
_LOCATION_CARET = re.compile(r"\b([A-Z][A-Z0-9]{2})\^(\d{0,4})\^(\d{1,3})(?:\^(\d{0,3})(?:\^(\d{0,3}))?)?")
_OFFSET = re.compile(r"\b(?:offset|byte)\s+(\d{1,9})\b", re.IGNORECASE)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)?")
_LINE_BYTES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
# MLLP framing (VT ... FS) and blanks around a segment are not part of it. ASCII only, so a line
# is blank in the stored bytes exactly when it is blank in the text.
_FRAMING = " \t\x0b\x0c\x1c\r\n"


def _is_blank(line: str) -> bool:
    return not line.strip(_FRAMING)


# --- the view -------------------------------------------------------------------------------------


@dataclass
class Hl7Component:
    number: int
    value: str  # ER7 text of the component, subcomponents joined
    subcomponents: list[str]  # more than one only when `&` splits it
    flagged: bool = False


@dataclass
class Hl7Repetition:
    number: int
    components: list[Hl7Component]


@dataclass
class Hl7Field:
    segment: str
    number: int
    name: str
    value: str  # ER7 text of the whole field (masked when the view is)
    repetitions: list[Hl7Repetition]
    flags: list[str] = field(default_factory=list)  # why it is flagged: "issue 1", "exception detail"
    masked: bool = False

    @property
    def position(self) -> str:
        if not self.segment:
            return "text" if self.number == 0 else f"?-{self.number}"
        return f"{self.segment}-{self.number}"

    @property
    def structured(self) -> bool:
        """More than a plain value: repetitions, components or subcomponents to show apart."""
        return len(self.repetitions) > 1 or any(
            len(r.components) > 1 or len(c.subcomponents) > 1 for r in self.repetitions for c in r.components
        )


@dataclass
class Hl7Segment:
    name: str
    position: int  # 1-based row in the message (blank lines skipped)
    sequence: int  # 1 for the first PID, 2 for the second... (ERR-2's segment sequence)
    fields: list[Hl7Field]
    flags: list[str] = field(default_factory=list)  # the segment as a whole (a byte offset in it)

    @property
    def description(self) -> str:
        if not self.name:
            return "not an HL7 segment"
        if self.name.startswith("Z"):
            return f"Z-segment ({SITE_DEFINED})"
        return SEGMENT_NAMES.get(self.name, "")

    @property
    def flagged(self) -> bool:
        return bool(self.flags) or any(f.flags for f in self.fields)

    @property
    def rows(self) -> list[Hl7Field]:
        """The fields a reviewer reads: those with a value, and flagged ones even when empty."""
        return [
            f for f in self.fields if f.flags or any(c.value for r in f.repetitions for c in r.components)
        ]


@dataclass
class RawPiece:
    text: str
    control: str = ""  # for a control character: what it is, e.g. "CR (0x0D)"


@dataclass
class RawLine:
    pieces: list[RawPiece]
    segment: int | None  # Hl7Segment.position of the segment on this line
    flagged: bool = False


@dataclass
class Hl7View:
    segments: list[Hl7Segment]
    raw_lines: list[RawLine]  # empty when masked: the raw view is PHI
    masked: bool
    parser: str  # "python-hl7", or why the hand splitter was used
    hidden_segments: int = 0  # segments past MAX_SEGMENTS (shown in the raw view only)

    @property
    def first_flag_id(self) -> str | None:
        """The anchor of the first flagged row, for a "go to the error" link."""
        for segment in self.segments:
            if segment.flags:
                return f"hl7-seg-{segment.position}"
            for f in segment.fields:
                if f.flags:
                    return f"hl7-{segment.position}-{f.number}"
        return None


# --- parsing --------------------------------------------------------------------------------------

# A field as nested lists: repetitions → components → subcomponents (strings).
Tree = list[list[list[str]]]


@dataclass(frozen=True)
class _Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    subcomponent: str = "&"


def _separators(first_line: str) -> _Separators | None:
    """The separators MSH-1/MSH-2 declare, or None when they are unusable (then the defaults)."""
    if first_line[:3] not in HEADER_SEGMENTS or len(first_line) < 5:
        return None
    sep = first_line[3]
    end = first_line.find(sep, 4)
    encoding = first_line[4:end]
    chars = [sep, *encoding[:4]]
    # python-hl7 misreads an MSH-2 not closed by a field separator, so that is "unusable" too.
    if (
        end == -1
        or len(encoding) < 2
        or len(set(chars)) != len(chars)
        or any(c.isalnum() or c.isspace() for c in chars)
    ):
        return None
    return _Separators(sep, encoding[0], encoding[1], encoding[3] if len(encoding) > 3 else "&")


def _split_by_hand(lines: list[str], seps: _Separators) -> list[list[Tree]]:
    out = []
    for line in lines:
        parts = line.split(seps.field)
        if line[:3] in HEADER_SEGMENTS and len(line) > 3 and line[3] == seps.field:
            parts = [line[:3], seps.field, *parts[1:]]
        fields: list[Tree] = [[[[parts[0]]]]]
        for number, text in enumerate(parts[1:], start=1):
            if line[:3] in HEADER_SEGMENTS and number <= 2:
                fields.append([[[text]]])
                continue
            fields.append(
                [
                    [c.split(seps.subcomponent) for c in r.split(seps.component)]
                    for r in text.split(seps.repetition)
                ]
            )
        out.append(fields)
    return out


def _tree(node) -> Tree:
    """A python-hl7 Field as nested lists: a plain str at any level is one child of itself."""
    if isinstance(node, str):
        return [[[node]]]
    reps = []
    for rep in node:
        if isinstance(rep, str):
            reps.append([[rep]])
            continue
        comps = []
        for comp in rep:
            comps.append([comp] if isinstance(comp, str) else [str(s) for s in comp])
        reps.append(comps)
    return reps


def _split_with_hl7(lines: list[str], seps: _Separators) -> list[list[Tree]]:
    import hl7

    message = hl7.parse("\r".join(lines))
    if len(message) != len(lines):
        raise ValueError("python-hl7 found a different number of segments")
    out = []
    for segment, line in zip(message, lines, strict=True):
        if str(segment[0]) != line.split(seps.field)[0]:
            raise ValueError("python-hl7 read a different segment id")
        fields = [_tree(f) for f in segment]
        if line[:3] in HEADER_SEGMENTS:  # MSH-1 and MSH-2 are values, never split
            fields[1:3] = [[[[str(f)]]] for f in segment[1:3]]
        out.append(fields)
    return out


def _parse(lines: list[str]) -> tuple[list[list[Tree]], _Separators, str]:
    seps = _separators(lines[0]) if lines else None
    if seps is None:
        if not lines:
            reason = "empty"
        elif lines[0][:3] not in HEADER_SEGMENTS:
            reason = "does not start with MSH, FHS or BHS"
        else:
            reason = "MSH-1/MSH-2 unusable, standard separators assumed"
        return _split_by_hand(lines, _Separators()), _Separators(), f"split by hand ({reason})"
    try:
        return _split_with_hl7(lines, seps), seps, "python-hl7"
    except Exception as exc:  # python-hl7 raises IndexError, ParseException... on garbage
        reason = f"python-hl7: {type(exc).__name__}"
    return _split_by_hand(lines, seps), seps, f"split by hand ({reason})"


# --- where the problems are -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Location:
    segment: str
    sequence: int | None  # None: every occurrence of the segment
    field: int
    component: int | None = None


def _locations(text: str) -> set[_Location]:
    found = set()
    for seg, number, comp, _sub in _LOCATION_DASH.findall(text):
        found.add(_Location(seg, None, int(number), int(comp) if comp else None))
    for seg, sequence, number, _rep, comp in _LOCATION_CARET.findall(text):
        found.add(
            _Location(seg, int(sequence) if sequence else None, int(number), int(comp) if comp else None)
        )
    return {loc for loc in found if loc.field > 0}


def _issue_texts(issue: dict) -> list[str]:
    texts = [str(e) for e in issue.get("expression") or []]
    texts += [str(issue[k]) for k in ("location", "diagnostics") if issue.get(k)]
    return texts


def _line_spans(text: str, raw: bytes | None) -> tuple[list[tuple[int, int]], bytes]:
    """(start, end) byte spans of the non-blank lines: ER7 separators are ASCII, so the lines of the
    stored bytes are the lines of the text in every ASCII-compatible encoding."""
    data = raw if raw is not None else text.encode("utf-8", "surrogatepass")
    framing = _FRAMING.encode()
    spans = [
        (m.start(), m.start() + len(m.group().rstrip(b"\r\n")))
        for m in _LINE_BYTES.finditer(data)
        if m.group().strip(framing)
    ]
    if raw is not None and len(spans) != sum(1 for m in _LINE.finditer(text) if not _is_blank(m.group())):
        return _line_spans(text, None)  # not ASCII-compatible (UTF-16): count in UTF-8 instead
    return spans, data


def _offset_hits(
    offsets: Iterable[int], text: str, raw: bytes | None, lines: list[str], seps: _Separators
) -> list[tuple[int, int, int | None]]:
    """(offset, line index, field number or None) for each byte offset; past the end: the last line."""
    spans, data = _line_spans(text, raw)
    hits = []
    for offset in offsets:
        if not spans:
            break
        index = next((i for i, (_, end) in enumerate(spans) if offset <= end), len(spans) - 1)
        start, end = spans[index]
        column = offset - start
        number = None
        if 3 <= column < end - start:
            before = data[start : start + column].count(seps.field.encode("utf-8", "replace"))
            header = lines[index][:3] in HEADER_SEGMENTS
            number = before + 1 if header else before or None
        hits.append((offset, index, number))
    return hits


# --- building the view ----------------------------------------------------------------------------


def _mask_tree(tree: Tree) -> Tree:
    return [[[MASK if s else "" for s in comp] for comp in rep] for rep in tree]


def _er7(tree: Tree, seps: _Separators) -> str:
    return seps.repetition.join(
        seps.component.join(seps.subcomponent.join(comp) for comp in rep) for rep in tree
    )


def _field_name(segment: str, number: int) -> str:
    if not segment:
        return "not an HL7 segment"
    if segment.startswith("Z"):
        return SITE_DEFINED
    names = FIELD_NAMES.get(segment, ())
    return names[number - 1] if 0 < number <= len(names) else ""


def hl7_view(
    text: str,
    *,
    issues: Sequence[dict] = (),
    detail: str | None = None,
    raw: bytes | None = None,
    masked: bool = False,
) -> Hl7View:
    """The field table (and, unless masked, the raw view) of an ER7 message. Never raises.

    `issues` are the latest attempt's issues (numbered from 1 as the console lists them), `detail`
    the exception's own text (a reported error, a parse problem), `raw` the stored bytes that byte
    offsets count in. `masked` hides every value not in VISIBLE_WHEN_MASKED."""
    text = text or ""
    lines = [m.group().strip(_FRAMING) for m in _LINE.finditer(text) if not _is_blank(m.group())]
    trees, seps, parser = _parse(lines)

    sources: list[tuple[str, list[str]]] = [
        (f"issue {n}", _issue_texts(issue)) for n, issue in enumerate(issues, start=1)
    ]
    if detail:
        sources.append(("exception detail", [detail]))

    segments: list[Hl7Segment] = []
    seen: dict[str, int] = {}
    for position, tree in enumerate(trees, start=1):
        segment_id = _er7(tree[0], seps)
        name = segment_id if _SEGMENT_ID.fullmatch(segment_id) else ""
        seen[name] = seen.get(name, 0) + 1
        # Text before the first separator that is no segment id is kept as "field 0".
        fields = [] if name else [_build_field(name, 0, tree[0], seps, masked)]
        fields += [_build_field(name, n, value, seps, masked) for n, value in enumerate(tree[1:], start=1)]
        segments.append(Hl7Segment(name, position, seen[name], fields))

    for label, texts in sources:
        locations = set().union(*(_locations(t) for t in texts))
        # `OBX-5` beside `OBX^2^5` (our ACK issues carry both): the located one wins.
        located = {(loc.segment, loc.field) for loc in locations if loc.sequence is not None}
        locations = {
            loc for loc in locations if loc.sequence is not None or (loc.segment, loc.field) not in located
        }
        for loc in locations:
            for segment in segments:
                if segment.name == loc.segment and loc.sequence in (None, segment.sequence):
                    _flag_field(segment, loc, label, seps, masked)
        offsets = sorted({int(n) for t in texts for n in _OFFSET.findall(t)})
        for offset, index, number in _offset_hits(offsets, text, raw, lines, seps):
            segment = segments[index]
            note = f"{label}: byte {offset}"
            if note not in segment.flags:
                segment.flags.append(note)
            if number is not None:
                _flag_field(segment, _Location(segment.name, None, number), label, seps, masked)

    flagged = {s.position for s in segments if s.flagged}
    shown = [s for s in segments if s.position <= MAX_SEGMENTS or s.position in flagged]
    hidden = len(segments) - len(shown)
    raw_lines = [] if masked else raw_view(text, flagged)
    return Hl7View(shown, raw_lines, masked, parser, hidden)


def _build_field(segment: str, number: int, tree: Tree, seps: _Separators, masked: bool) -> Hl7Field:
    hidden = masked and number not in VISIBLE_WHEN_MASKED.get(segment, frozenset())
    if hidden:
        tree = _mask_tree(tree)
    repetitions = [
        Hl7Repetition(
            r,
            [Hl7Component(c, seps.subcomponent.join(subs), subs) for c, subs in enumerate(rep, start=1)],
        )
        for r, rep in enumerate(tree, start=1)
    ]
    value = _er7(tree, seps) if not (segment in HEADER_SEGMENTS and number <= 2) else tree[0][0][0]
    return Hl7Field(segment, number, _field_name(segment, number), value, repetitions, masked=hidden)


def _flag_field(segment: Hl7Segment, loc: _Location, label: str, seps: _Separators, masked: bool) -> None:
    target = next((f for f in segment.fields if f.number == loc.field), None)
    if target is None:  # named but absent: an empty required field is the usual error
        target = _build_field(segment.name, loc.field, [[[""]]], seps, masked)
        segment.fields.append(target)
        segment.fields.sort(key=lambda f: f.number)
    if label not in target.flags:
        target.flags.append(label)
    if loc.component is not None:
        for rep in target.repetitions:
            for comp in rep.components:
                if comp.number == loc.component:
                    comp.flagged = True


# --- the raw view ---------------------------------------------------------------------------------

# The C0 controls by their standard abbreviations (ASCII), plus what the HL7/MLLP ones are for.
_C0 = [
    "NUL",
    "SOH",
    "STX",
    "ETX",
    "EOT",
    "ENQ",
    "ACK",
    "BEL",
    "BS",
    "TAB",
    "LF",
    "VT",
    "FF",
    "CR",
    "SO",
    "SI",
    "DLE",
    "DC1",
    "DC2",
    "DC3",
    "DC4",
    "NAK",
    "SYN",
    "ETB",
    "CAN",
    "EM",
    "SUB",
    "ESC",
    "FS",
    "GS",
    "RS",
    "US",
]
_ROLES = {0x0A: "line feed", 0x0B: "MLLP start block", 0x0D: "segment terminator", 0x1C: "MLLP end block"}


def _control(char: str) -> RawPiece | None:
    # Shown as <CR>-style tokens, not Unicode control pictures (␍): few fonts carry those.
    code = ord(char)
    if code < 0x20:
        role = f", {_ROLES[code]}" if code in _ROLES else ""
        return RawPiece(f"<{_C0[code]}>", f"{_C0[code]} (0x{code:02X}){role}")
    if code == 0x7F:
        return RawPiece("<DEL>", "DEL (0x7F)")
    if 0x80 <= code <= 0x9F:
        return RawPiece(f"<{code:02X}>", f"C1 control character U+{code:04X}")
    if code == 0xFEFF:
        return RawPiece("<BOM>", "byte order mark U+FEFF")
    return None


def raw_view(text: str, flagged_positions: Iterable[int] = ()) -> list[RawLine]:
    """The text as stored, one line per segment, every control character shown as a token with its
    name: <CR> ends a segment, <VT> and <FS> are MLLP framing, <NUL>, <ESC>... the rest."""
    flagged = set(flagged_positions)
    out: list[RawLine] = []
    position = 0
    for line in _LINE.finditer(text or ""):
        chunk = line.group()
        if not chunk:
            continue
        is_segment = not _is_blank(chunk)
        if is_segment:
            position += 1
        pieces: list[RawPiece] = []
        plain = []
        for char in chunk:
            piece = _control(char)
            if piece is None:
                plain.append(char)
                continue
            if plain:
                pieces.append(RawPiece("".join(plain)))
                plain = []
            pieces.append(piece)
        if plain:
            pieces.append(RawPiece("".join(plain)))
        segment = position if is_segment else None
        out.append(RawLine(pieces, segment, segment in flagged))
    return out
