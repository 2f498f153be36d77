"""A synthetic FHIR R4 corpus with the quirks production traffic really has.

Everything here is invented: no patient, practitioner or identifier belongs to anyone.
Codes are real RxNorm / LOINC / SNOMED CT / ICD-10-CM / ICD-9-CM codes so that the
payloads read like the real thing (NDC package codes and OIDs are illustrative). Builders are pure functions of their arguments (pass a
`random.Random` for variety), so `seed.demo` produces the same corpus for the same seed.

The deliberate quirks are named constants and functions below; each comment names the
real-world problem it models (see "EHR Integration: A Modern Engineer's Guide for 2026",
section "The sandbox doesn't match production": code-set mismatches, encoding quirks,
unexpected Unicode, merged patient records, dates in unusual formats, custom site rules).
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

# --------------------------------------------------------------------------- code systems

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NDC = "http://hl7.org/fhir/sid/ndc"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"
UCUM = "http://unitsofmeasure.org"
NPI = "http://hl7.org/fhir/sid/us-npi"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

FHIR_JSON = "application/fhir+json"
MESSAGE_TYPES = (
    "MedicationRequest",
    "ServiceRequest",
    "Observation",
    "DiagnosticReport",
    "Encounter",
    "Patient",
)


def coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


# --------------------------------------------------------------------------- people


@dataclass(frozen=True)
class SyntheticPatient:
    """An invented patient. `alt_name` is the same person in another script."""

    key: str
    given: tuple[str, ...]
    family: str
    birth_date: str
    gender: str
    city: str
    alt_name: str | None = None
    language: tuple[str, str] = ("en-US", "English")
    family_first: bool = False  # Vietnamese order: family name, then given names

    @property
    def display(self) -> str:
        if self.family_first:
            return " ".join((self.family, *self.given))
        return " ".join((*self.given, self.family))


# Names with diacritics, several scripts, typographic apostrophes and combining marks: the
# field guide's "Unicode in places you didn't expect". Vietnamese names are family-first.
# fmt: off
PATIENTS: tuple[SyntheticPatient, ...] = (
    SyntheticPatient("jose-nunez", ("José",), "Núñez", "1958-03-14", "male", "Milwaukee", language=("es", "Spanish")),
    SyntheticPatient("zoe-odegard", ("Zoë",), "Ødegård", "1991-11-02", "female", "Minneapolis", language=("nb", "Norwegian Bokmål")),
    SyntheticPatient("nguyen-thi-hoa", ("Thị", "Hoa"), "Nguyễn", "1949-07-21", "female", "Houston", language=("vi", "Vietnamese"), family_first=True),
    SyntheticPatient("siobhan-o-briain", ("Siobhán",), "Ó Briain", "1983-01-30", "female", "Boston"),
    SyntheticPatient("francois-lefevre", ("François",), "Lefèvre", "1967-05-09", "male", "New Orleans", language=("fr", "French")),
    SyntheticPatient("bjorn-astrom", ("Björn",), "Åström", "1975-09-17", "male", "Duluth"),
    SyntheticPatient("lukasz-wisniewski", ("Łukasz",), "Wiśniewski", "2001-02-11", "male", "Chicago", language=("pl", "Polish")),
    SyntheticPatient("martins-berzins", ("Mārtiņš",), "Bērziņš", "1944-12-03", "male", "Cleveland", language=("lv", "Latvian")),
    SyntheticPatient("chloe-dubois-muller", ("Chloé",), "Dubois-Müller", "1988-06-25", "female", "Madison"),
    # A typographic apostrophe (U+2019), as pasted from a word processor.
    SyntheticPatient("sean-oconnell", ("Seán",), "O\u2019Connell", "1962-08-08", "male", "Providence"),
    SyntheticPatient("mary-kate-oneil", ("Mary-Kate",), "O'Neil", "1999-04-01", "female", "Hartford"),
    # Yoruba ọ̀ has no precomposed form: ọ (U+1ECD) + combining grave (U+0300), two code points.
    SyntheticPatient("ngozi-okonkwo", ("Ngozi",), "Okonkwo-Adébáyọ\u0300", "1979-10-19", "female", "Atlanta", language=("yo", "Yoruba")),
    SyntheticPatient("dmitrii-smirnov", ("Dmitrii",), "Smirnov", "1955-02-27", "male", "Brooklyn", alt_name="Дмитрий Смирнов", language=("ru", "Russian")),
    SyntheticPatient("li-wei", ("Wei",), "Li", "1986-03-08", "male", "San Francisco", alt_name="李伟", language=("zh", "Chinese")),
    SyntheticPatient("ayse-yilmaz", ("Ayşe",), "Yılmaz", "1993-12-12", "female", "Paterson", language=("tr", "Turkish")),
    SyntheticPatient("soren-ostergaard", ("Søren",), "Østergaard", "1970-07-04", "male", "Racine"),
    SyntheticPatient("thora-sigurdardottir", ("Þóra",), "Sigurðardóttir", "1952-09-30", "female", "Seattle"),
    SyntheticPatient("ana-lucia-ferrandez", ("Ana", "Lucía"), "Ferrández Peña", "1946-01-15", "female", "El Paso", language=("es", "Spanish")),
    SyntheticPatient("aroha-te-whiu", ("Aroha",), "Te Whiu", "2004-05-22", "female", "Honolulu"),
    SyntheticPatient("renee-beaulieu", ("Renée",), "Beaulieu", "1938-10-10", "female", "Burlington", language=("fr", "French")),
)
# fmt: on


@dataclass(frozen=True)
class Practitioner:
    key: str
    display: str
    npi: str


def npi_check_digit(first_nine: str) -> str:
    """The Luhn check digit of an NPI (computed over the prefix 80840 + nine digits)."""
    digits = [int(d) for d in "80840" + first_nine]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return first_nine + str((10 - total % 10) % 10)


PRACTITIONERS: tuple[Practitioner, ...] = (
    Practitioner("pr-okafor", "Dr. Chidinma Okafor", npi_check_digit("198765432")),
    Practitioner("pr-haddad", "Dr. Samir Haddad", npi_check_digit("156789012")),
    Practitioner("pr-lindqvist", "Dr. Ingrid Lindqvist", npi_check_digit("134567890")),
    Practitioner("pr-moreau", "Dr. Étienne Moreau", npi_check_digit("167890123")),
    Practitioner("pr-tanaka", "Dr. Yuki Tanaka", npi_check_digit("145678901")),
    Practitioner("pr-brennan", "Maeve Brennan, NP", npi_check_digit("189012345")),
)

# --------------------------------------------------------------------------- terminology


@dataclass(frozen=True)
class Medication:
    rxnorm: str
    display: str
    text: str
    sig: str
    dose_unit: str
    reason: tuple[str, str]  # ICD-10-CM code, display
    ndc: str  # an NDC-style package code, for the NDC-instead-of-RxNorm quirk (illustrative)


# fmt: off
MEDICATIONS: tuple[Medication, ...] = (
    Medication("314076", "lisinopril 10 MG Oral Tablet", "Lisinopril 10 mg tablet", "Take 1 tablet by mouth once daily", "tablet", ("I10", "Essential (primary) hypertension"), "68180-0513-01"),
    Medication("197361", "amlodipine 5 MG Oral Tablet", "Amlodipine 5 mg tablet", "Take 1 tablet by mouth once daily", "tablet", ("I10", "Essential (primary) hypertension"), "00093-7167-98"),
    Medication("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet", "Metformin ER 500 mg tablet", "Take 1 tablet by mouth with the evening meal", "tablet", ("E11.9", "Type 2 diabetes mellitus without complications"), "00378-7187-01"),
    Medication("855332", "warfarin sodium 5 MG Oral Tablet", "Warfarin 5 mg tablet", "Take 1 tablet by mouth daily at 17:00, adjust per INR", "tablet", ("I48.91", "Unspecified atrial fibrillation"), "00093-1721-01"),
    Medication("308192", "amoxicillin 500 MG Oral Tablet", "Amoxicillin 500 mg", "Take 1 tablet by mouth every 8 hours for 7 days", "tablet", ("J18.9", "Pneumonia, unspecified organism"), "00093-2263-01"),
    Medication("313782", "acetaminophen 325 MG Oral Tablet", "Acetaminophen 325 mg tablet", "Take 2 tablets by mouth every 6 hours as needed for pain", "tablet", ("R07.9", "Chest pain, unspecified"), "00904-6730-61"),
    Medication("310429", "furosemide 20 MG Oral Tablet", "Furosemide 20 mg tablet", "Take 1 tablet by mouth every morning", "tablet", ("N18.9", "Chronic kidney disease, unspecified"), "00054-4297-25"),
)
# fmt: on


@dataclass(frozen=True)
class LabTest:
    loinc: str
    display: str
    text: str
    unit: str
    ucum: str
    low: float
    high: float
    decimals: int = 1


# fmt: off
LAB_TESTS: tuple[LabTest, ...] = (
    LabTest("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "Hemoglobin A1c", "%", "%", 4.0, 5.6),
    LabTest("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "Glucose", "mg/dL", "mg/dL", 70, 99, 0),
    LabTest("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "Creatinine", "mg/dL", "mg/dL", 0.6, 1.3, 2),
    LabTest("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "Potassium", "mmol/L", "mmol/L", 3.5, 5.1),
    LabTest("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "Sodium", "mmol/L", "mmol/L", 136, 145, 0),
    LabTest("718-7", "Hemoglobin [Mass/volume] in Blood", "Hemoglobin", "g/dL", "g/dL", 12.0, 17.5),
    LabTest("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "WBC", "10*3/uL", "10*3/uL", 4.5, 11.0),
    LabTest("6301-6", "INR in Platelet poor plasma by Coagulation assay", "INR", "{INR}", "{INR}", 0.8, 1.2),
    LabTest("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "Total cholesterol", "mg/dL", "mg/dL", 100, 199, 0),
)
# fmt: on


VITALS: tuple[LabTest, ...] = (
    LabTest("8867-4", "Heart rate", "Heart rate", "/min", "/min", 60, 100, 0),
    LabTest("29463-7", "Body weight", "Body weight", "kg", "kg", 50, 110),
    LabTest("8310-5", "Body temperature", "Body temperature", "Cel", "Cel", 36.1, 37.8),
)

# (panel LOINC, display, member tests)
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "24323-8",
        "Comprehensive metabolic 2000 panel - Serum or Plasma",
        ("2345-7", "2160-0", "2823-3", "2951-2"),
    ),
    ("58410-2", "CBC panel - Blood by Automated count", ("718-7", "6690-2")),
    ("57698-3", "Lipid panel with direct LDL - Serum or Plasma", ("2093-3",)),
)

# Orders: (system, code, display, category SNOMED code, category display)
ORDERABLES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        LOINC,
        "24323-8",
        "Comprehensive metabolic 2000 panel - Serum or Plasma",
        "108252007",
        "Laboratory procedure",
    ),
    (LOINC, "58410-2", "CBC panel - Blood by Automated count", "108252007", "Laboratory procedure"),
    (LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "108252007", "Laboratory procedure"),
    (
        LOINC,
        "6301-6",
        "INR in Platelet poor plasma by Coagulation assay",
        "108252007",
        "Laboratory procedure",
    ),
    (SNOMED, "399208008", "Plain chest X-ray", "363679005", "Imaging"),
)

CONDITIONS_ICD10: tuple[tuple[str, str], ...] = (
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("I10", "Essential (primary) hypertension"),
    ("I48.91", "Unspecified atrial fibrillation"),
    ("E78.5", "Hyperlipidemia, unspecified"),
    ("Z00.00", "Encounter for general adult medical examination without abnormal findings"),
    ("J45.909", "Unspecified asthma, uncomplicated"),
)

# ICD-9-CM codes still emitted by a module that was never remapped, with their ICD-10-CM
# equivalents (the General Equivalence Mappings' obvious targets).
ICD9_TO_ICD10: dict[tuple[str, str], tuple[str, str]] = {
    (
        "250.00",
        "Diabetes mellitus without mention of complication, type II or unspecified type, not stated as uncontrolled",
    ): (
        "E11.9",
        "Type 2 diabetes mellitus without complications",
    ),
    ("401.9", "Unspecified essential hypertension"): ("I10", "Essential (primary) hypertension"),
    ("427.31", "Atrial fibrillation"): ("I48.91", "Unspecified atrial fibrillation"),
    ("272.4", "Other and unspecified hyperlipidemia"): ("E78.5", "Hyperlipidemia, unspecified"),
}

# A lab's local result code that was never mapped to LOINC.
LOCAL_LAB_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.5.1"  # an invented lab OID
LOCAL_LAB_CODES: tuple[tuple[str, str, str], ...] = (
    ("GLU-SER", "GLUCOSE, SERUM", "2345-7"),
    ("K-SER", "POTASSIUM", "2823-3"),
    ("HGB-A1C", "HGB A1C (POC)", "4548-4"),
)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """Where a message is going and about whom: the references a payload needs."""

    patient: SyntheticPatient
    patient_id: str  # the EHR's logical id for this patient at this customer
    mrn_system: str
    mrn: str
    practitioner: Practitioner
    encounter_id: str
    organization: str
    when: datetime  # clinically relevant time (naive UTC)
    extra: dict[str, Any] = field(default_factory=dict)


def fhir_instant(value: datetime) -> str:
    return value.replace(microsecond=0).isoformat() + "Z"


def _subject(ctx: Context) -> dict[str, str]:
    return {"reference": f"Patient/{ctx.patient_id}", "display": ctx.patient.display}


def _requester(ctx: Context) -> dict[str, Any]:
    who = ctx.practitioner
    return {
        "reference": f"Practitioner/{who.key}",
        "identifier": {"system": NPI, "value": who.npi},
        "display": who.display,
    }


# --------------------------------------------------------------------------- well-formed resources


def medication_request(ctx: Context, med: Medication, rng: random.Random) -> dict[str, Any]:
    """An outpatient prescription as an ordering product sends it."""
    days = rng.choice((30, 90))
    per_day = 2 if "every 6 hours" in med.sig else 1
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "category": [
            {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                        "outpatient",
                        "Outpatient",
                    )
                ]
            }
        ],
        "medicationCodeableConcept": {"coding": [coding(RXNORM, med.rxnorm, med.display)], "text": med.text},
        "subject": _subject(ctx),
        "encounter": {"reference": f"Encounter/{ctx.encounter_id}"},
        "authoredOn": fhir_instant(ctx.when),
        "requester": _requester(ctx),
        "reasonCode": [{"coding": [coding(ICD10CM, *med.reason)]}],
        "dosageInstruction": [
            {
                "sequence": 1,
                "text": med.sig,
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "route": {"coding": [coding(SNOMED, "26643006", "Oral route")]},
                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": med.dose_unit}}],
            }
        ],
        "dispenseRequest": {
            "numberOfRepeatsAllowed": rng.choice((0, 1, 3, 5)),
            "quantity": {"value": days * per_day, "unit": med.dose_unit},
            "expectedSupplyDuration": {"value": days, "unit": "days", "system": UCUM, "code": "d"},
        },
        "substitution": {"allowedBoolean": True},
    }


def service_request(
    ctx: Context, rng: random.Random, *, reason: tuple[str, str, str] | None = None
) -> dict[str, Any]:
    """A lab or imaging order. `reason` is (system, code, display)."""
    system, code, display, cat_code, cat_display = rng.choice(ORDERABLES)
    reason = reason or (ICD10CM, *rng.choice(CONDITIONS_ICD10))
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [coding(SNOMED, cat_code, cat_display)]}],
        "priority": rng.choice(("routine", "routine", "routine", "urgent", "stat")),
        "code": {"coding": [coding(system, code, display)], "text": display},
        "subject": _subject(ctx),
        "encounter": {"reference": f"Encounter/{ctx.encounter_id}"},
        "occurrenceDateTime": fhir_instant(ctx.when + timedelta(days=rng.choice((0, 0, 1, 7)))),
        "authoredOn": fhir_instant(ctx.when),
        "requester": _requester(ctx),
        "reasonCode": [{"coding": [coding(*reason)]}],
        "note": [
            {
                "text": rng.choice(
                    ("Fasting preferred.", "Patient prefers morning draw.", "Compare with prior.")
                )
            }
        ],
    }


def _value(test: LabTest, rng: random.Random) -> tuple[float, str | None]:
    span = test.high - test.low
    value = round(rng.uniform(test.low - 0.3 * span, test.high + 0.6 * span), test.decimals)
    if test.decimals == 0:
        value = int(value)
    flag = "H" if value > test.high else "L" if value < test.low else None
    return value, flag


def observation(
    ctx: Context, rng: random.Random, *, test: LabTest | None = None, vital: bool = False
) -> dict[str, Any]:
    """A final lab result (or a vital sign) as an interface engine posts it."""
    test = test or rng.choice(VITALS if vital else LAB_TESTS)
    vital = vital or test in VITALS
    value, flag = _value(test, rng)
    doc: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    coding(OBSERVATION_CATEGORY, "vital-signs", "Vital Signs")
                    if vital
                    else coding(OBSERVATION_CATEGORY, "laboratory", "Laboratory")
                ]
            }
        ],
        "code": {"coding": [coding(LOINC, test.loinc, test.display)], "text": test.text},
        "subject": _subject(ctx),
        "encounter": {"reference": f"Encounter/{ctx.encounter_id}"},
        "effectiveDateTime": fhir_instant(ctx.when - timedelta(hours=rng.randint(1, 20))),
        "issued": fhir_instant(ctx.when),
        "performer": [
            {"display": ctx.organization + " Laboratory" if not vital else ctx.practitioner.display}
        ],
        "valueQuantity": {"value": value, "unit": test.unit, "system": UCUM, "code": test.ucum},
    }
    if not vital:
        doc["referenceRange"] = [
            {
                "low": {"value": test.low, "unit": test.unit, "system": UCUM, "code": test.ucum},
                "high": {"value": test.high, "unit": test.unit, "system": UCUM, "code": test.ucum},
            }
        ]
        if flag:
            shown = {"H": "High", "L": "Low"}[flag]
            doc["interpretation"] = [{"coding": [coding(V3_INTERPRETATION, flag, shown)]}]
    return doc


def blood_pressure(ctx: Context, rng: random.Random) -> dict[str, Any]:
    """A blood pressure panel with systolic/diastolic components."""
    systolic, diastolic = rng.randint(104, 178), rng.randint(62, 104)
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [coding(OBSERVATION_CATEGORY, "vital-signs", "Vital Signs")]}],
        "code": {"coding": [coding(LOINC, "85354-9", "Blood pressure panel with all children optional")]},
        "subject": _subject(ctx),
        "encounter": {"reference": f"Encounter/{ctx.encounter_id}"},
        "effectiveDateTime": fhir_instant(ctx.when),
        "component": [
            {
                "code": {"coding": [coding(LOINC, "8480-6", "Systolic blood pressure")]},
                "valueQuantity": {"value": systolic, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [coding(LOINC, "8462-4", "Diastolic blood pressure")]},
                "valueQuantity": {"value": diastolic, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
        ],
    }


def diagnostic_report(ctx: Context, rng: random.Random) -> dict[str, Any]:
    """A final lab panel report pointing at its member results."""
    loinc, display, members = rng.choice(PANELS)
    ids = [f"obs-{rng.randrange(16**10):010x}" for _ in members]
    return {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [{"coding": [coding(V2_0074, "LAB", "Laboratory")]}],
        "code": {"coding": [coding(LOINC, loinc, display)], "text": display},
        "subject": _subject(ctx),
        "encounter": {"reference": f"Encounter/{ctx.encounter_id}"},
        "effectiveDateTime": fhir_instant(ctx.when - timedelta(hours=rng.randint(2, 30))),
        "issued": fhir_instant(ctx.when),
        "performer": [{"display": ctx.organization + " Laboratory"}],
        "result": [{"reference": f"Observation/{i}"} for i in ids],
        "conclusion": rng.choice(
            (
                "No critical values.",
                "See individual results.",
                "Hemolyzed specimen; K+ may be falsely elevated.",
            )
        ),
    }


def encounter(
    ctx: Context, rng: random.Random, *, reason: tuple[str, str, str] | None = None
) -> dict[str, Any]:
    """An ambulatory visit, as a scheduling product reports it."""
    start = ctx.when - timedelta(minutes=rng.randint(20, 90))
    reason = reason or (ICD10CM, *rng.choice(CONDITIONS_ICD10))
    return {
        "resourceType": "Encounter",
        "status": rng.choice(("finished", "finished", "in-progress")),
        "class": {"system": V3_ACT_CODE, "code": "AMB", "display": "ambulatory"},
        "type": [{"coding": [coding(SNOMED, "185349003", "Encounter for check up")]}],
        "subject": _subject(ctx),
        "participant": [{"individual": _requester(ctx)}],
        "period": {"start": fhir_instant(start), "end": fhir_instant(ctx.when)},
        "reasonCode": [{"coding": [coding(*reason)]}],
        "serviceProvider": {"display": ctx.organization},
    }


def patient(ctx: Context, rng: random.Random) -> dict[str, Any]:
    """A demographics update (registration), with a second name in another script when known."""
    p = ctx.patient
    names: list[dict[str, Any]] = [
        {"use": "official", "family": p.family, "given": list(p.given), "text": p.display}
    ]
    if p.alt_name:
        names.append({"use": "usual", "text": p.alt_name})
    return {
        "resourceType": "Patient",
        "id": ctx.patient_id,
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [coding(V2_0203, "MR", "Medical record number")]},
                "system": ctx.mrn_system,
                "value": ctx.mrn,
            }
        ],
        "active": True,
        "name": names,
        "telecom": [{"system": "phone", "value": f"555-01{rng.randint(0, 99):02d}", "use": "mobile"}],
        "gender": p.gender,
        "birthDate": p.birth_date,
        "address": [
            {"use": "home", "line": [f"{rng.randint(10, 9999)} Example St"], "city": p.city, "country": "US"}
        ],
        "communication": [
            {"language": {"coding": [coding("urn:ietf:bcp:47", *p.language)]}, "preferred": True}
        ],
    }


def well_formed(message_type: str, ctx: Context, rng: random.Random) -> dict[str, Any]:
    """A valid FHIR R4 resource of `message_type`."""
    if message_type == "MedicationRequest":
        return medication_request(ctx, rng.choice(MEDICATIONS), rng)
    if message_type == "ServiceRequest":
        return service_request(ctx, rng)
    if message_type == "Observation":
        return (
            blood_pressure(ctx, rng)
            if rng.random() < 0.15
            else observation(ctx, rng, vital=rng.random() < 0.3)
        )
    if message_type == "DiagnosticReport":
        return diagnostic_report(ctx, rng)
    if message_type == "Encounter":
        return encounter(ctx, rng)
    if message_type == "Patient":
        return patient(ctx, rng)
    raise ValueError(f"no builder for {message_type}")


def to_text(resource: dict[str, Any]) -> str:
    """FHIR JSON as a product sends it: UTF-8, non-ASCII kept as is."""
    return json.dumps(resource, ensure_ascii=False, indent=None, separators=(",", ":"))


# --------------------------------------------------------------------------- deliberate quirks
#
# Each quirk returns the resource (or bytes) to submit and, where a reviewer could fix it, the
# corrected resource a human would resubmit.


def icd9_reason(ctx: Context, rng: random.Random, message_type: str) -> tuple[dict, dict]:
    """ICD-9-CM where ICD-10-CM is expected -> EHR answers code-invalid (category code_set).

    Models the field guide's "customer is on an older ICD-9 mapping in one module and
    ICD-10 in another": the ordering module's problem list was never remapped after the
    2015 ICD-10 transition.
    """
    (code9, display9), (code10, display10) = rng.choice(list(ICD9_TO_ICD10.items()))
    builder = service_request if message_type == "ServiceRequest" else encounter
    bad = builder(ctx, rng, reason=(ICD9CM, code9, display9))
    fixed = json.loads(json.dumps(bad))
    fixed["reasonCode"] = [{"coding": [coding(ICD10CM, code10, display10)]}]
    return bad, fixed


def ndc_instead_of_rxnorm(ctx: Context, rng: random.Random) -> tuple[dict, dict]:
    """A medication coded only with an NDC package code -> EHR refuses the code system (code_set).

    Models pharmacy systems that key on the dispensed package (NDC) while the EHR's order
    catalogue matches on RxNorm clinical drugs.
    """
    med = rng.choice(MEDICATIONS)
    bad = medication_request(ctx, med, rng)
    bad["medicationCodeableConcept"] = {"coding": [coding(NDC, med.ndc, med.text.upper())], "text": med.text}
    fixed = medication_request(ctx, med, rng)
    fixed["dispenseRequest"] = bad["dispenseRequest"]
    return bad, fixed


def local_lab_code(ctx: Context, rng: random.Random) -> tuple[dict, dict]:
    """A result coded only with the lab's local code -> EHR cannot file it (code_set).

    Models a reference lab whose compendium was never mapped to LOINC for one new test.
    """
    local, local_display, loinc = rng.choice(LOCAL_LAB_CODES)
    test = next(t for t in LAB_TESTS if t.loinc == loinc)
    fixed = observation(ctx, rng, test=test)
    bad = json.loads(json.dumps(fixed))
    bad["code"] = {"coding": [coding(LOCAL_LAB_SYSTEM, local, local_display)], "text": local_display}
    return bad, fixed


def missing_required_field(ctx: Context, rng: random.Random, message_type: str) -> tuple[dict, dict]:
    """A resource without an element FHIR R4 requires -> our own validation refuses it (data_shape).

    Models a product build that dropped a mandatory element (MedicationRequest.intent,
    Observation.status, Encounter.class) after a refactor; nothing is sent to the EHR.
    """
    fixed = well_formed(message_type, ctx, rng)
    bad = json.loads(json.dumps(fixed))
    drop = {
        "MedicationRequest": "intent",
        "ServiceRequest": "intent",
        "Observation": "status",
        "Encounter": "class",
    }
    bad.pop(drop.get(message_type, "status"), None)
    return bad, fixed


def unusual_date_format(ctx: Context, rng: random.Random) -> tuple[dict, dict]:
    """A US-style date in a FHIR dateTime -> our own validation refuses it (data_shape).

    Models the field guide's "dates in unusual formats": a legacy scheduling field copied
    verbatim ("03/02/2026 2:15 PM") into a FHIR element that must be ISO 8601.
    """
    fixed = medication_request(ctx, rng.choice(MEDICATIONS), rng)
    bad = json.loads(json.dumps(fixed))
    bad["authoredOn"] = ctx.when.strftime("%m/%d/%Y %I:%M %p")
    return bad, fixed


def prescriber_not_active(ctx: Context, rng: random.Random) -> tuple[dict, dict]:
    """An order from a practitioner the site has not credentialed -> business-rule (ehr_rejected).

    Models per-customer configuration: the same NPI is valid at one Epic instance and unknown
    at another. The fix is to resubmit under the covering prescriber.
    """
    bad = medication_request(ctx, rng.choice(MEDICATIONS), rng)
    fixed = json.loads(json.dumps(bad))
    cover = rng.choice([p for p in PRACTITIONERS if p.key != ctx.practitioner.key])
    fixed["requester"] = _requester(replace(ctx, practitioner=cover))
    return bad, fixed


def no_dosage_instruction(ctx: Context, rng: random.Random) -> tuple[dict, dict]:
    """Valid R4 without dosageInstruction, which this site requires -> required (ehr_rejected).

    Models a site rule (custom build) beyond base FHIR: Epic-like instances refuse medication
    orders without structured dosage.
    """
    fixed = medication_request(ctx, rng.choice(MEDICATIONS), rng)
    bad = json.loads(json.dumps(fixed))
    bad.pop("dosageInstruction")
    return bad, fixed


def merged_patient(ctx: Context, rng: random.Random, message_type: str) -> tuple[dict, dict]:
    """A message about a patient record that was merged away -> business-rule (ehr_rejected).

    Models the field guide's "historical merging that didn't quite complete": the product
    still holds the non-surviving record's id. The fix points at the surviving record.
    """
    bad = well_formed(message_type, ctx, rng)
    fixed = json.loads(json.dumps(bad))
    fixed["subject"] = {
        "reference": f"Patient/{ctx.extra['surviving_patient_id']}",
        "display": ctx.patient.display,
    }
    return bad, fixed


def truncated_json(resource: dict[str, Any], rng: random.Random) -> bytes:
    """JSON cut off mid-document -> not parseable at intake (data_shape).

    Models an interface engine channel with a fixed maximum field length that silently cuts
    long messages (and a reverse proxy that closes an upload early).
    """
    raw = to_text(resource).encode("utf-8")
    cut = rng.randint(len(raw) // 3, (2 * len(raw)) // 3)
    while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # do not split a UTF-8 sequence
        cut += 1
    return raw[:cut]


def encodes_in_cp1252(text: str) -> bool:
    try:
        text.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def windows_1252_bytes(resource: dict[str, Any]) -> bytes:
    """The resource encoded as Windows-1252 -> not UTF-8, refused at intake (data_shape).

    Models the field guide's "occasional Windows-1252 from imported documents": a Windows
    desktop tool exports the JSON in the ANSI code page, so "é" is the single byte 0xE9 and
    "’" is 0x92. FHIR JSON must be UTF-8, so the original bytes are kept and flagged.
    """
    return to_text(resource).encode("cp1252")


def mismatched_resource_type(ctx: Context, rng: random.Random) -> dict[str, Any]:
    """A MedicationStatement sent as message_type MedicationRequest -> shape error (data_shape).

    Models a product feature that pushed a home-medication list (statements of what the
    patient takes) down the order channel; no correction makes it an order.
    """
    med = rng.choice(MEDICATIONS)
    return {
        "resourceType": "MedicationStatement",
        "status": "active",
        "medicationCodeableConcept": {"coding": [coding(RXNORM, med.rxnorm, med.display)], "text": med.text},
        "subject": _subject(ctx),
        "effectivePeriod": {"start": (ctx.when.date() - timedelta(days=rng.randint(30, 900))).isoformat()},
        "dateAsserted": fhir_instant(ctx.when),
        "informationSource": {"reference": f"Patient/{ctx.patient_id}"},
        "dosage": [{"text": med.sig}],
    }


def with_bom(resource: dict[str, Any]) -> str:
    """UTF-8 with a byte-order mark: accepted (utf-8-sig) and delivered.

    Models .NET's default StreamWriter encoding, which prefixes U+FEFF; intake strips it.
    """
    return "\ufeff" + to_text(resource)


def submit_body(
    connection: str, message_type: str, *, text: str | None = None, raw: bytes | None = None
) -> dict:
    """The JSON body of POST /api/v1/messages for a text payload or raw bytes (base64)."""
    body = {"connection": connection, "message_type": message_type, "content_type": FHIR_JSON}
    if raw is not None:
        body["payload_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        body["payload"] = text
    return body


# --------------------------------------------------------------------------- what EHRs answer
#
# The answers a FHIR server (or whatever sits in front of it) gives, as the simulator and real
# EHRs send them. `seed.demo` feeds them to the FHIR adapter's own `classify`, so the demo's
# categories come from the same mapping as production.

# Failures below HTTP: (httpx exception class, message).
TRANSPORT_ERRORS: dict[str, tuple[str, str]] = {
    # The customer's site-to-site VPN is down, so the firewall refuses: nothing was sent.
    "refused": ("ConnectError", "[Errno 111] Connection refused"),
    # The FHIR host's DNS record vanished during a data-center cutover: nothing was sent.
    "dns": ("ConnectError", "[Errno -3] Temporary failure in name resolution"),
    # The customer's load balancer certificate expired overnight: nothing was sent.
    "tls": (
        "ConnectError",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired (_ssl.c:1000)",
    ),
    # Sent, then no answer within the read timeout: the EHR may or may not have applied it.
    "timeout": ("ReadTimeout", "The read operation timed out"),
    # Sent, then a proxy closed the idle connection before the answer: applied or not, unknown.
    "dropped": ("RemoteProtocolError", "Server disconnected without sending a response."),
}

# A remote-access gateway's sign-in page, served with 200 to an API client when the gateway
# session in front of the EHR expires: a "success" that is not FHIR at all.
REMOTE_ACCESS_LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in - Remote Access</title></head><body>"
    '<form action="/vpn/index.html" method="post">Your session has expired. Please sign in again.'
    "</form></body></html>"
)
NOT_FOUND_PAGE = "<html><body><h1>404 Not Found</h1></body></html>"


@dataclass(frozen=True)
class EhrAnswer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def operation_outcome(code: str, diagnostics: str, expression: list[str] | None = None) -> dict[str, Any]:
    """A one-issue OperationOutcome, shaped like the simulator's."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _fhir(status: int, doc: dict[str, Any], **headers: str) -> EhrAnswer:
    return EhrAnswer(status, json.dumps(doc).encode("utf-8"), {"Content-Type": FHIR_JSON, **headers})


def ehr_answer(
    signal: str,
    ctx: Context,
    *,
    resource_type: str,
    resource_id: str,
    location: str,
    identifier: str,
    reason_code: str | None,
    at: datetime,
    rng: random.Random,
) -> EhrAnswer:
    """The HTTP answer to `POST [base]/[resource_type]` for one of the signals below."""
    rtype = resource_type
    created = {
        "resourceType": rtype,
        "id": resource_id,
        "meta": {"versionId": "1", "lastUpdated": fhir_instant(at)},
    }
    if signal == "created":  # 201 + Location, as Epic-like servers answer
        return _fhir(201, created, Location=location)
    if signal == "created_200":  # Oracle Health-like: 200 (not 201) and no Location for a create
        return _fhir(200, created)
    if signal == "503":  # a scheduled maintenance window, refused before processing
        oo = operation_outcome(
            "transient", "Scheduled maintenance: FHIR services unavailable 02:00-04:00 local time"
        )
        return _fhir(503, oo, **{"Retry-After": "600"})
    if signal == "429":  # per-client rate limit during the customer's morning batch
        oo = operation_outcome("throttled", "Request rate limit exceeded (120/min) for client recon-console")
        return _fhir(429, oo, **{"Retry-After": "30"})
    if signal == "500":  # a database deadlock inside the EHR: it may have applied before failing
        detail = (
            "Unexpected error filing the resource (ORA-00060: deadlock detected while waiting for resource)"
        )
        return _fhir(500, operation_outcome("exception", detail))
    if signal == "422_dosage":  # site rule beyond base FHIR (see no_dosage_instruction)
        path = f"{rtype}.dosageInstruction"
        return _fhir(422, operation_outcome("required", f"{path} is required by this server", [path]))
    if signal == "422_prescriber":  # see prescriber_not_active
        who = ctx.practitioner
        detail = f"Requester {who.display} (NPI {who.npi}) is not credentialed to order at this facility"
        return _fhir(422, operation_outcome("business-rule", detail, [f"{rtype}.requester"]))
    if signal == "422_merged":  # see merged_patient
        detail = (
            f"Patient/{ctx.patient_id} was merged into Patient/{ctx.extra['surviving_patient_id']}; "
            "reference the surviving record"
        )
        return _fhir(422, operation_outcome("business-rule", detail, [f"{rtype}.subject"]))
    if signal == "422_icd9":  # see icd9_reason; worded like the simulator's icd9-strict profile
        detail = f"Code system {ICD9CM} is not accepted (code {reason_code!r})"
        return _fhir(
            422, operation_outcome("code-invalid", detail, [f"{rtype}.reasonCode[0].coding[0].system"])
        )
    if signal == "422_ndc":  # see ndc_instead_of_rxnorm
        detail = (
            f"Code system {NDC} is not supported for {rtype}.medicationCodeableConcept; send an RxNorm coding"
        )
        expression = [f"{rtype}.medicationCodeableConcept.coding[0].system"]
        return _fhir(422, operation_outcome("not-supported", detail, expression))
    if signal == "422_local":  # see local_lab_code
        detail = (
            f"{rtype}.code has no LOINC coding; code system {LOCAL_LAB_SYSTEM} is not mapped in this instance"
        )
        return _fhir(422, operation_outcome("code-invalid", detail, [f"{rtype}.code"]))
    if signal == "html":  # see REMOTE_ACCESS_LOGIN_PAGE
        return EhrAnswer(200, REMOTE_ACCESS_LOGIN_PAGE.encode(), {"Content-Type": "text/html; charset=utf-8"})
    if signal == "202":  # "accepted for asynchronous processing", with nothing to say what was created
        return EhrAnswer(202)
    if signal == "truncated201":  # the response body cut off by a proxy buffer limit
        return EhrAnswer(
            201, json.dumps(created).encode()[: rng.randint(20, 40)], {"Content-Type": FHIR_JSON}
        )
    if signal == "409":  # the EHR's own duplicate check: the first attempt landed after all
        detail = f"{rtype} with identifier {identifier} already exists ({rtype}/{resource_id})"
        return _fhir(409, operation_outcome("duplicate", detail))
    if signal == "412":  # If-None-Exist matched two resources (someone also keyed it by hand)
        detail = f"If-None-Exist matched 2 {rtype} resources; nothing was created"
        return _fhir(412, operation_outcome("duplicate", detail))
    if signal == "401":  # the access token expired (clock skew, or the secret was rotated)
        return _fhir(
            401,
            operation_outcome("expired", "Access token expired"),
            **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if signal == "403":  # the client's SMART scopes at this site do not include the write
        detail = f"Client recon-console lacks scope system/{rtype}.write at this site"
        return _fhir(403, operation_outcome("forbidden", detail))
    if signal == "404":  # the base URL moved in the customer's upgrade; a web server's HTML 404
        return EhrAnswer(404, NOT_FOUND_PAGE.encode(), {"Content-Type": "text/html"})
    raise ValueError(f"unknown EHR answer {signal!r}")
