"""Code-set checks at intake (SPEC 3.2 `code_set`): the other ICD revision than the connection's EHR
expects is a problem naming where it is; a coding system we do not recognise is only observed
(drift: `unknown_code_system`). Also the FHIR elements a resource's R4B model does not define
(`new_fhir_element`). Pure; never raises.

A coded value that carries a code in the expected revision as well (an HL7 CWE with an alternate
code, a FHIR CodeableConcept with a translation) is fine: the EHR gets what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .hl7_parse import (
    Er7Segment,
    Separators,
    er7_segments,
    field_name,
    offset_phrase,
    read_separators,
)
from .payloads import FHIR_JSON, HL7_ER7, Observation, parse_fhir_json

ICD9, ICD10, ANY = "icd-9", "icd-10", "any"
EXPECTED_LABELS = {ICD9: "ICD-9", ICD10: "ICD-10"}
MAX_OBSERVATIONS = 50
_MAX_DEPTH = 40  # FHIR resources nest a dozen deep; a deeper document is not walked further
_MAX_NODES = 50_000  # nor is a huge one beyond this many values

# FHIR Coding.system → (label, ICD revision or None). Anything under a known prefix is known too.
FHIR_SYSTEMS: dict[str, tuple[str, str | None]] = {
    "http://hl7.org/fhir/sid/icd-9-cm": ("ICD-9-CM", ICD9),
    "http://hl7.org/fhir/sid/icd-9": ("ICD-9", ICD9),
    "http://terminology.hl7.org/CodeSystem/icd9cm": ("ICD-9-CM", ICD9),
    "http://terminology.hl7.org/CodeSystem/icd9": ("ICD-9", ICD9),
    "urn:oid:2.16.840.1.113883.6.2": ("ICD-9-CM", ICD9),
    "urn:oid:2.16.840.1.113883.6.103": ("ICD-9-CM", ICD9),
    "urn:oid:2.16.840.1.113883.6.104": ("ICD-9-CM procedures", ICD9),
    "http://hl7.org/fhir/sid/icd-10-cm": ("ICD-10-CM", ICD10),
    "http://hl7.org/fhir/sid/icd-10": ("ICD-10", ICD10),
    "http://www.cms.gov/Medicare/Coding/ICD10": ("ICD-10-PCS", ICD10),
    "http://hl7.org/fhir/sid/icd-10-pcs": ("ICD-10-PCS", ICD10),
    "urn:oid:2.16.840.1.113883.6.90": ("ICD-10-CM", ICD10),
    "urn:oid:2.16.840.1.113883.6.3": ("ICD-10", ICD10),
    "urn:oid:2.16.840.1.113883.6.4": ("ICD-10-PCS", ICD10),
    "http://loinc.org": ("LOINC", None),
    "http://snomed.info/sct": ("SNOMED CT", None),
    "http://www.nlm.nih.gov/research/umls/rxnorm": ("RxNorm", None),
    "http://hl7.org/fhir/sid/ndc": ("NDC", None),
    "http://unitsofmeasure.org": ("UCUM", None),
    "http://www.ama-assn.org/go/cpt": ("CPT", None),
    "http://hl7.org/fhir/sid/cvx": ("CVX", None),
    "http://www.whocc.no/atc": ("ATC", None),
    "http://fdasis.nlm.nih.gov": ("UNII", None),
    "http://nucc.org/provider-taxonomy": ("NUCC", None),
    "http://dicom.nema.org/resources/ontology/DCM": ("DICOM", None),
    "http://www.ada.org/snodent": ("SNODENT", None),
    "https://www.usps.com/": ("USPS", None),
}
FHIR_SYSTEM_PREFIXES = (
    "http://terminology.hl7.org/",
    "http://hl7.org/fhir/",
    "http://snomed.info/",
    "urn:oid:",
    "urn:ietf:",
    "urn:iso:",
)

# HL7 v2 coding system names (table 0396, and the spellings engines really send) → (label, revision).
HL7_SYSTEMS: dict[str, tuple[str, str | None]] = {
    **dict.fromkeys(("I9", "ICD9", "ICD-9"), ("ICD-9", ICD9)),
    **dict.fromkeys(("I9C", "I9CM", "ICD9CM", "ICD-9-CM", "I9CDX"), ("ICD-9-CM", ICD9)),
    **dict.fromkeys(("I9CP",), ("ICD-9-CM procedures", ICD9)),
    **dict.fromkeys(("I10", "ICD10", "ICD-10"), ("ICD-10", ICD10)),
    **dict.fromkeys(("I10C", "ICD10CM", "ICD-10-CM"), ("ICD-10-CM", ICD10)),
    **dict.fromkeys(("I10P", "ICD10PCS", "ICD-10-PCS"), ("ICD-10-PCS", ICD10)),
    **dict.fromkeys(("LN", "LOINC"), ("LOINC", None)),
    **dict.fromkeys(("SCT", "SNM", "SNM3", "SNOMED", "SNOMEDCT", "SNOMED-CT"), ("SNOMED CT", None)),
    **dict.fromkeys(("RXNORM", "RXN"), ("RxNorm", None)),
    "NDC": ("NDC", None),
    **dict.fromkeys(("C4", "C5", "CPT", "CPT4", "CPT-4"), ("CPT", None)),
    **dict.fromkeys(("HCPCS", "HPC"), ("HCPCS", None)),
    **dict.fromkeys(("UCUM", "ISO+", "ANS+"), ("units", None)),
    "CVX": ("CVX", None),
    "MVX": ("MVX", None),
    "NUCC": ("NUCC", None),
    "DCM": ("DICOM", None),
    "ISO639": ("ISO 639 languages", None),
    "ISO3166": ("ISO 3166 countries", None),
    "ISO4217": ("ISO 4217 currencies", None),
    "CDCREC": ("CDC race and ethnicity", None),
    "NUBC": ("NUBC", None),
    "CDT": ("CDT dental", None),
    "UMLS": ("UMLS", None),
    "MDC": ("ISO/IEEE 11073", None),
    "L": ("local", None),  # table 0396 sanctions local codes: L or 99zzz
}
_HL7_TABLE = re.compile(r"HL7\d{4}|99[A-Z0-9]{0,3}")  # HL7-defined tables (HL70357), local (99zzz)

# HL7 v2.5.1 fields of type CE/CWE/CNE (identifier ^ text ^ coding system, and an alternate in 4-6).
CODED_FIELDS: frozenset[tuple[str, int]] = frozenset(
    {
        ("MSH", 19),
        ("PID", 10),
        ("PID", 15),
        ("PID", 16),
        ("PID", 17),
        ("PID", 22),
        ("PID", 26),
        ("PID", 28),
        ("NK1", 3),
        ("PV2", 3),
        ("DG1", 3),
        ("PR1", 3),
        ("AL1", 3),
        ("AL1", 4),
        ("ORC", 16),
        ("OBR", 4),
        ("OBR", 31),
        ("OBX", 3),
        ("OBX", 6),
        ("OBX", 17),
        ("SPM", 4),
        ("RXO", 1),
        ("RXO", 4),
        ("RXO", 5),
        ("RXE", 2),
        ("RXE", 5),
        ("RXE", 6),
        ("RXR", 1),
        ("SCH", 6),
        ("SCH", 7),
        ("AIS", 3),
        ("NTE", 4),
        ("ERR", 3),
    }
)
_CODED_VALUE_TYPES = {"CE", "CWE", "CNE"}  # OBX-2 values under which OBX-5 is coded too


@dataclass(frozen=True)
class _Coding:
    where: str  # short, for drift: "DG1-3", "Condition.code.coding[0]"
    # For the problem: "DG1-3 (Diagnosis Code) at byte offset 120". Worked out only when needed:
    # a byte offset costs a pass over the text, and a big result message has thousands of codings.
    described: Callable[[], str]
    system: str  # as sent
    code: str
    label: str  # "ICD-9-CM (I9C)"; '' when we do not know the system
    revision: str | None  # icd-9 | icd-10 | None


class _Findings:
    """The first mismatch (the problem), how many more, and the observations."""

    def __init__(self, expected: str):
        self.expected = expected
        self.problem: str | None = None
        self.more = 0
        self.observations: list[Observation] = []
        self._noted: set[tuple[str, str]] = set()

    def note(self, kind: str, where: str, detail: Callable[[], str]) -> None:
        if (kind, where) not in self._noted and len(self.observations) < MAX_OBSERVATIONS:
            self._noted.add((kind, where))
            self.observations.append(Observation(kind, where, detail()))

    def concept(self, codings: list[_Coding]) -> None:
        """One coded value (an HL7 CWE repetition, a FHIR CodeableConcept), judged as a whole."""
        for coding in codings:
            if not coding.label:
                self.note("unknown_code_system", coding.where, lambda coding=coding: _unknown(coding))
        if self.expected not in EXPECTED_LABELS or self.expected in {c.revision for c in codings}:
            return
        wanted = EXPECTED_LABELS[self.expected]
        other = next((c for c in codings if c.revision is not None), None)
        if other is None:
            return
        self.note("unknown_code_system", other.where, lambda: f"{other.label} where {wanted} is expected")
        if self.problem is None:
            self.problem = (
                f"{other.described()} is {other.label} {other.code[:40]}; this connection expects {wanted}"
            )
        else:
            self.more += 1

    def result(self) -> tuple[str | None, list[Observation]]:
        problem = self.problem
        if problem and self.more:
            problem += f" (and {self.more} more coded value{'s' if self.more > 1 else ''} like it)"
        return problem, self.observations


def _unknown(coding: _Coding) -> str:
    described = coding.described()
    where = "" if described == coding.where else f" ({described})"
    return f"coding system {coding.system[:200]!r} is not one we know{where}"


def check_codes(
    content_type: str, text: str, document: dict | None, expected: str, *, encoding: str | None = None
) -> tuple[str | None, list[Observation]]:
    """(the code_set problem or None, observations) of one payload for a connection whose EHR
    expects `expected` (icd-10 | icd-9 | any) in diagnosis codes. `document`: the parsed FHIR
    resource when the caller has it; `encoding`: how `text` was decoded (offsets in bytes)."""
    findings = _Findings(expected)
    try:
        if content_type == HL7_ER7:
            _check_hl7(findings, text, encoding)
        elif content_type == FHIR_JSON:
            if document is None:
                document, _ = parse_fhir_json(text)
            if isinstance(document, dict):
                root = document.get("resourceType")
                _walk(findings, document, root if isinstance(root, str) else "$", 0, [0])
    except Exception:  # never past intake: what was found so far stands
        pass
    return findings.result()


# --- HL7 v2 ---------------------------------------------------------------------------------------


def hl7_system(name: str) -> tuple[str, str | None]:
    """(label, revision) of an HL7 coding system name; label '' when we do not know it."""
    key = name.strip().upper()
    if key in HL7_SYSTEMS:
        return HL7_SYSTEMS[key]
    if _HL7_TABLE.fullmatch(key):
        return ("HL7 table" if key.startswith("HL7") else "local"), None
    return "", None


def _check_hl7(findings: _Findings, text: str, encoding: str | None) -> None:
    seps = read_separators(text)
    for segment in er7_segments(text, seps):
        coded = [n for s, n in CODED_FIELDS if s == segment.name]
        if segment.name == "OBX" and segment.field(2)[0].strip().upper() in _CODED_VALUE_TYPES:
            coded.append(5)
        for number in sorted(coded):
            _hl7_field(findings, segment, number, seps, text, encoding)


def _hl7_field(findings, segment: Er7Segment, number: int, seps: Separators, text, encoding) -> None:
    value, offset = segment.field(number)
    if not value:
        return
    # DG1-2 (Diagnosis Coding Method, deprecated) names the system when DG1-3 leaves it out.
    method = segment.field(2)[0].strip() if segment.name == "DG1" and number == 3 else ""
    position = offset
    for index, repetition in enumerate(value.split(seps.repetition), start=1):
        components = [c.strip() for c in repetition.split(seps.component)]
        where = segment.label(number) + ("" if index == 1 else f" repetition {index}")
        described = f"{field_name(segment.name, number)}{'' if index == 1 else f' repetition {index}'}"
        codings = []
        for code_at, system_at in ((0, 2), (3, 5)):  # CWE.1/CWE.3, and the alternate CWE.4/CWE.6
            code = components[code_at] if len(components) > code_at else ""
            system = components[system_at] if len(components) > system_at else ""
            system = system or (method if code_at == 0 and code else "")
            if not system:
                continue  # a bare code or an empty alternate: nothing to judge it by
            label, revision = hl7_system(system)
            codings.append(
                _Coding(
                    where,
                    lambda described=described, at=position: (
                        f"{described} {offset_phrase(text, at, encoding)}"
                    ),
                    system,
                    code,
                    f"{label} ({system})" if label else "",
                    revision,
                )
            )
        if codings:
            findings.concept(codings)
        position += len(repetition) + len(seps.repetition)


# --- FHIR -----------------------------------------------------------------------------------------


def fhir_system(system: str) -> tuple[str, str | None]:
    """(label, revision) of a FHIR Coding.system; label '' when we do not know it."""
    if system in FHIR_SYSTEMS:
        return FHIR_SYSTEMS[system]
    if system.startswith(FHIR_SYSTEM_PREFIXES):
        return system, None
    return "", None


def _coding(path: str, coding: dict) -> _Coding | None:
    system = coding.get("system")
    if not isinstance(system, str):
        return None
    code = coding.get("code")
    label, revision = fhir_system(system)
    return _Coding(path, lambda: path, system, code if isinstance(code, str) else "", label, revision)


def _walk(findings: _Findings, value, path: str, depth: int, budget: list[int]) -> None:
    budget[0] += 1
    if depth > _MAX_DEPTH or budget[0] > _MAX_NODES:
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _walk(findings, item, f"{path}[{index}]", depth + 1, budget)
        return
    if not isinstance(value, dict):
        return
    codings = value.get("coding")
    if isinstance(codings, list):  # a CodeableConcept: its codings are judged together
        found = [_coding(f"{path}.coding[{i}]", c) for i, c in enumerate(codings) if isinstance(c, dict)]
        found = [c for c in found if c is not None]
        if found:
            findings.concept(found)
    elif "code" in value and isinstance(value.get("system"), str):  # a bare Coding (or a Quantity)
        found_one = _coding(path, value)
        if found_one is not None:
            findings.concept([found_one])
    for key, item in value.items():
        if key == "coding" or not isinstance(item, dict | list):
            continue
        _walk(findings, item, f"{path}.{key}", depth + 1, budget)


def new_fhir_elements(document: dict | None) -> list[Observation]:
    """`new_fhir_element` observations: top-level elements the R4B model of the resource's type does
    not define. Unknown resource types are skipped (the EHR will say); never raises."""
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        return []
    resource_type = document["resourceType"]
    try:
        known = _r4b_elements(resource_type)
    except Exception:
        return []
    if known is None:
        return []
    unknown = [key for key in document if key not in known]
    return [
        Observation("new_fhir_element", f"{resource_type}.{key[:100]}", "not defined by FHIR R4B")
        for key in unknown[:MAX_OBSERVATIONS]
    ]


@lru_cache(maxsize=256)
def _r4b_elements(resource_type: str) -> frozenset[str] | None:
    """JSON names of a resource type's elements in fhir.resources' R4B model; None if not a resource."""
    if not re.fullmatch(r"[A-Z][A-Za-z]{1,63}", resource_type):
        return None
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        model = get_fhir_model_class(resource_type)
    except ValueError:
        return None
    if not issubclass(model, Resource):
        return None
    names = {"resourceType"}
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
    return frozenset(names)
