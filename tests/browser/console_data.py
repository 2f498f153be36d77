"""A small data set that makes every console page show something, and a login helper, for the
browser tests of issue 8."""

from __future__ import annotations

from playwright.sync_api import expect

from app.db.models import User
from app.db.session import transaction
from app.services import exceptions, saved_views
from tests.conftest import PASSWORD
from tests.factories import (
    HL7_CONTENT_TYPE,
    HL7_ORU,
    REJECTION_ISSUES,
    make_exception,
    medication_request,
    setup_connection,
)


def build_estate(sessions, users) -> dict[str, int]:
    """A few exceptions that make every page show something: FHIR with issues, HL7 v2, an
    escalated one, a corrected one waiting for approval, a shared saved view."""
    setup_connection(sessions)
    setup_connection(sessions, "Valley Clinic", "valley-mllp", protocol="hl7v2-mllp")
    fhir = make_exception(
        sessions, users["svc"], issues=REJECTION_ISSUES, detail="EHR create (HTTP 422): code-invalid"
    )
    hl7 = make_exception(
        sessions,
        users["svc"],
        connection="valley-mllp",
        content_type=HL7_CONTENT_TYPE,
        payload=HL7_ORU,
        message_type="ORU^R01",
        category="code_set",
    )
    escalated = make_exception(sessions, users["svc"], category="transport")
    pending = make_exception(sessions, users["svc"], category="ehr_rejected")
    with transaction(sessions) as s:
        rita = s.get(User, users["rita"].id)
        exceptions.decide(s, escalated, rita, exceptions.DecisionInput("escalate", "needs a lead"))
        exceptions.decide(
            s,
            pending,
            rita,
            exceptions.DecisionInput(
                "resubmit_corrected", "wrong code", payload=medication_request(code="999999")
            ),
        )
        saved_views.save_view(s, rita, "Breached", "all", "sla_status=breached", True)
    return {"fhir": fhir, "hl7": hl7, "escalated": escalated, "pending": pending}


def login(page, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".whoami")).to_contain_text(username)
