"""Steps 3-7 of the core loop in a real browser: a reviewer corrects a rejected order,
a different clinical lead approves it with the password, the replay resolves it."""

import json
import re

import pytest
import sqlalchemy as sa
from playwright.sync_api import expect

from app.db.models import ExceptionItem
from app.db.session import transaction
from app.services import audit
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body

pytestmark = pytest.mark.browser


def login(page, base, username):
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".whoami")).to_contain_text(username)


def logout(page):
    page.click(".whoami button")
    expect(page).to_have_url(re.compile(r"/login"))


def test_reviewer_corrects_lead_approves_replay_resolves(
    page, live_server, client, users, fhir_connection, sim_control, run_worker, sessions
):
    sim_control.set_profile(
        fhir_connection.tenant, require_fields={"MedicationRequest": ["dosageInstruction"]}
    )
    r = client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", medication_request(5, with_dosage=False)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "browser-1"},
    )
    assert r.status_code == 202
    run_worker()
    with transaction(sessions) as s:
        exc_id = s.scalar(sa.select(ExceptionItem.id).where(ExceptionItem.category == "ehr_rejected"))

    # 3-4. the reviewer finds it in the ehr_rejected queue, reads the OperationOutcome, corrects it
    login(page, live_server, "rita")
    page.goto(f"{live_server}/queues/ehr_rejected")
    page.click(f"a[href='/exceptions/{exc_id}']")
    expect(page.locator("body")).to_contain_text("dosageInstruction")
    page.click("text=Open the correction editor")
    payload = json.loads(page.input_value("#payload"))
    payload["dosageInstruction"] = [{"text": "5 mg by mouth once daily"}]
    page.fill("#payload", json.dumps(payload, indent=2))
    page.fill("#reason", "added the dosage the EHR requires")
    page.click("button[name=preview], input[name=preview]")
    expect(page.locator("#diff")).to_contain_text("dosageInstruction")
    page.click("button[name=submit], input[name=submit]")
    expect(page.locator(".state")).to_contain_text("pending approval")
    logout(page)

    # 5. a different user, a clinical lead, approves with the password re-entered
    login(page, live_server, "lena")
    page.goto(f"{live_server}/approvals")
    page.click(f"[data-review-link='{exc_id}']")
    page.fill(f"#approval-{exc_id} input[name=password]", PASSWORD)
    page.click("text=Approve replay")
    expect(page.locator("[data-approval-done]")).to_contain_text(f"#{exc_id} approved")
    page.goto(f"{live_server}/exceptions/{exc_id}")
    expect(page.locator(".state")).to_contain_text("replaying")

    # 6. the worker replays it; the console shows it resolved
    run_worker()
    page.goto(f"{live_server}/exceptions/{exc_id}")
    expect(page.locator(".state")).to_contain_text("resolved")
    assert sim_control.applied_count(fhir_connection.tenant, "urn:recon:idempotency:svc", "browser-1") == 1

    # 7. the audit trail verifies
    with transaction(sessions) as s:
        assert audit.verify(s).ok
