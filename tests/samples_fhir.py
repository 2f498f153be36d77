"""Realistic, synthetic FHIR R4 samples for tests (no real patient data).

The module-level constants are shared: never mutate them; the functions return fresh copies.
"""

from __future__ import annotations

import copy
import json
from typing import Any

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
PLACER_SYSTEM = "urn:oid:2.16.840.1.113883.3.7418.1.1"  # a product's placer order number system
DELIVERY_SYSTEM = "urn:recon:delivery-id"  # the identifier system that carries the idempotency key

MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "identifier": [{"system": PLACER_SYSTEM, "value": "ORD-100001"}],
    "status": "active",
    "intent": "order",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                    "code": "outpatient",
                    "display": "Outpatient",
                }
            ]
        }
    ],
    "medicationCodeableConcept": {
        "coding": [{"system": RXNORM, "code": "197361", "display": "amlodipine 5 MG Oral Tablet"}],
        "text": "Amlodipine 5 mg tablet",
    },
    "subject": {"reference": "Patient/pat-1001", "display": "Test, Patient"},
    "authoredOn": "2024-05-01T10:15:00Z",
    "requester": {"reference": "Practitioner/prac-2001", "display": "Dr. Example"},
    "reasonCode": [
        {"coding": [{"system": ICD10, "code": "I10", "display": "Essential (primary) hypertension"}]}
    ],
    "dosageInstruction": [
        {
            "sequence": 1,
            "text": "Take 1 tablet by mouth once daily",
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
            "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]},
            "doseAndRate": [
                {
                    "doseQuantity": {
                        "value": 1,
                        "unit": "tablet",
                        "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
                        "code": "TAB",
                    }
                }
            ],
        }
    ],
    "dispenseRequest": {"numberOfRepeatsAllowed": 3, "quantity": {"value": 30, "unit": "tablet"}},
}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.7418.2.1", "value": "MRN-0001001"}],
    "active": True,
    "name": [{"family": "Test", "given": ["Patient"]}],
    "gender": "female",
    "birthDate": "1970-01-01",
}

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
    "subject": {"reference": "Patient/pat-1001"},
    "effectiveDateTime": "2024-05-01T10:00:00Z",
    "valueQuantity": {
        "value": 72,
        "unit": "beats/minute",
        "system": "http://unitsofmeasure.org",
        "code": "/min",
    },
}

# Medications cycled through by medication_request(n): (RxNorm code, display, dose text).
_MEDICATIONS = [
    ("197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily"),
    ("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily"),
    ("860975", "metformin hydrochloride 500 MG Oral Tablet", "Take 1 tablet by mouth twice daily with meals"),
    ("617312", "atorvastatin 10 MG Oral Tablet", "Take 1 tablet by mouth at bedtime"),
    ("308136", "amoxicillin 500 MG Oral Capsule", "Take 1 capsule by mouth every 8 hours for 7 days"),
]


def medication_request(n: int = 0, **overrides: Any) -> dict[str, Any]:
    """A distinct, valid MedicationRequest: order number, patient and drug vary with n."""
    resource = copy.deepcopy(MEDICATION_REQUEST)
    code, display, text = _MEDICATIONS[n % len(_MEDICATIONS)]
    resource["identifier"] = [{"system": PLACER_SYSTEM, "value": f"ORD-{100001 + n}"}]
    resource["medicationCodeableConcept"] = {
        "coding": [{"system": RXNORM, "code": code, "display": display}],
        "text": display,
    }
    resource["subject"] = {"reference": f"Patient/pat-{1001 + n}"}
    resource["authoredOn"] = f"2024-05-{1 + n % 28:02d}T10:15:00Z"
    resource["dosageInstruction"][0]["text"] = text
    resource.update(overrides)
    return resource


def patient(n: int = 0) -> dict[str, Any]:
    """A distinct, valid Patient."""
    resource = copy.deepcopy(PATIENT)
    resource["identifier"][0]["value"] = f"MRN-{1001001 + n:07d}"
    resource["name"] = [{"family": f"Test{n}", "given": ["Patient"]}]
    return resource


def observation(n: int = 0) -> dict[str, Any]:
    """A distinct, valid heart-rate Observation."""
    resource = copy.deepcopy(OBSERVATION)
    resource["subject"] = {"reference": f"Patient/pat-{1001 + n}"}
    resource["valueQuantity"]["value"] = 60 + n % 40
    return resource


def without(resource: dict[str, Any], *names: str) -> dict[str, Any]:
    """A copy of `resource` without the named top-level elements."""
    out = copy.deepcopy(resource)
    for name in names:
        out.pop(name, None)
    return out


def as_json(resource: dict[str, Any]) -> str:
    """The payload text as a product service would submit it."""
    return json.dumps(resource, indent=2)
