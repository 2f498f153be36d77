"""FHIR R4 samples for the loop tests (synthetic patients; RxNorm codes are real)."""

import copy
import json

MEDICATION_REQUEST = {
    "resourceType": "MedicationRequest",
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "197361",
                "display": "Amlodipine 5 MG Oral Tablet",
            }
        ]
    },
    "subject": {"reference": "Patient/pat-1001", "display": "José Núñez"},
    "authoredOn": "2026-11-30T08:00:00Z",
    "dosageInstruction": [{"text": "5 mg by mouth once daily"}],
}


def medication_request(n: int = 0, *, with_dosage: bool = True) -> dict:
    doc = copy.deepcopy(MEDICATION_REQUEST)
    doc["subject"]["reference"] = f"Patient/pat-{1000 + n}"
    doc["authoredOn"] = f"2026-11-30T08:{n % 60:02d}:00Z"
    if not with_dosage:
        del doc["dosageInstruction"]
    return doc


def message_body(connection: str, resource: dict) -> dict:
    return {
        "connection": connection,
        "message_type": resource["resourceType"],
        "content_type": "application/fhir+json",
        "payload": json.dumps(resource),
    }
