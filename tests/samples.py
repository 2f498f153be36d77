"""Message bodies for the API, built on the FHIR samples in tests/samples_fhir.py."""

import json

from tests.samples_fhir import medication_request as _medication_request
from tests.samples_fhir import without


def medication_request(n: int = 0, *, with_dosage: bool = True) -> dict:
    """A distinct valid MedicationRequest; without its dosage for the 'requires extra fields' quirk."""
    doc = _medication_request(n)
    return doc if with_dosage else without(doc, "dosageInstruction")


def message_body(connection: str, resource: dict) -> dict:
    """The JSON body of POST /api/v1/messages for one FHIR resource."""
    return {
        "connection": connection,
        "message_type": resource["resourceType"],
        "content_type": "application/fhir+json",
        "payload": json.dumps(resource),
    }
