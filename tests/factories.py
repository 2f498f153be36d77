"""Test data built through the real services: customers, connections, messages and exceptions."""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa

from app.db.models import Attempt, ExceptionItem, Message, User
from app.db.session import transaction
from app.domain.payloads import FHIR_JSON, HL7_ER7
from app.services import connections, intake
from app.services.exceptions import open_exception

HL7_ORU = (
    "MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||ORU^R01|CTRL0001|P|2.5.1\r"
    "PID|1||123456^^^MRN||DOE^JANE||19800101|F\r"
    "OBR|1|ORD1||718-7^Hemoglobin^LN\r"
    "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL|12-16|N|||F"
)

REJECTION_ISSUES = [
    {
        "severity": "error",
        "code": "code-invalid",
        "diagnostics": "Unknown code system http://example.org/icd9",
        "expression": ["MedicationRequest.medicationCodeableConcept.coding[0].system"],
    }
]


def medication_request(patient: str = "Patient/123456", code: str = "313782") -> str:
    return json.dumps(
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": patient},
            "medicationCodeableConcept": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code}]
            },
        },
        indent=2,
    )


def setup_connection(
    sessions,
    customer: str = "Mercy Health",
    name: str = "mercy-epic",
    *,
    protocol: str = "fhir-r4",
    **options,
):
    """A customer (created if missing) and a connection; returns the connection row."""
    with transaction(sessions) as s:
        if connections.by_name(s, name) is not None:
            return connections.by_name(s, name)
        from app.db.models import Customer

        if s.scalar(sa.select(Customer).where(Customer.name == customer)) is None:
            connections.add_customer(s, customer)
        endpoint = "http://ehr.invalid/fhir" if protocol == "fhir-r4" else "ehr.invalid:2575"
        return connections.add_connection(
            s, name, customer=customer, protocol=protocol, endpoint=endpoint, **options
        )


def make_exception(
    sessions,
    client: User,
    *,
    connection: str = "mercy-epic",
    category: str = "ehr_rejected",
    message_type: str = "MedicationRequest",
    payload: str | None = None,
    content_type: str = FHIR_JSON,
    key: str | None = None,
    patient: str = "Patient/123456",
    issues: list[dict] | None = None,
    detail: str = "HTTP 422 from the EHR",
) -> int:
    """Submit a message through intake and turn it into an open exception; returns the exception id.

    The connection (and its customer, "Mercy Health") is created on first use. With `issues`, a
    rejected attempt carrying them is recorded as the latest attempt.
    """
    with transaction(sessions) as s:
        missing = connections.by_name(s, connection) is None
    if missing:
        setup_connection(sessions, name=connection)
    if payload is None:
        payload = medication_request(patient) if content_type == FHIR_JSON else HL7_ORU
    key = key or f"key-{uuid.uuid4().hex[:12]}"
    body = {
        "connection": connection,
        "message_type": message_type,
        "payload": payload,
        "content_type": content_type,
    }
    with transaction(sessions) as s:
        result = intake.submit_message(s, client, key, body)
        message = s.get(Message, result.body["id"])
        if issues is not None:
            attempt = s.scalar(sa.select(Attempt).where(Attempt.message_id == message.id))
            attempt.outcome = "rejected"
            attempt.status_code = 422
            attempt.category = category
            attempt.issues = issues
            attempt.finished_at = attempt.started_at
            attempt.detail = detail
        existing = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message.id))
        if existing is not None:  # intake already refused it (data_shape / config)
            return existing.id
        message.status = "exception"
        item = open_exception(s, message, category, detail)
        return item.id


def make_exceptions(sessions, client: User, count: int, **kwargs) -> list[int]:
    """`count` exceptions, created one per transaction (distinct SLA due times)."""
    return [make_exception(sessions, client, **kwargs) for _ in range(count)]


HL7_CONTENT_TYPE = HL7_ER7
