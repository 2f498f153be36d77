"""The clinical lead's approvals work queue in a real browser (issue 8): a one-field correction is
one changed path; approving moves focus to the next item; another lead's approval in between is a
409 naming them, in place; Back after an htmx filter is a whole styled page; a session ended
mid-action goes to the login page and, after it, back to the item."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from app.db.models import Replay, User
from app.db.session import transaction
from app.services import exceptions
from app.services.users import end_sessions
from tests.conftest import PASSWORD
from tests.factories import make_exception

from .test_console_loop import login

pytestmark = pytest.mark.browser

ORDER = {
    "resourceType": "MedicationRequest",
    "status": "active",
    "intent": "order",
    "subject": {"reference": "Patient/123456"},
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "313782"}]
    },
    "dosageInstruction": [{"text": "1 tablet daily"}],
}


def corrected_replay(sessions, users, dose: str = "2 tablets daily") -> int:
    """An exception whose reviewer (rita) asked for a replay with one field corrected."""
    exc_id = make_exception(sessions, users["svc"], payload=json.dumps(ORDER, separators=(",", ":")))
    edited = json.loads(json.dumps(ORDER))
    edited["dosageInstruction"][0]["text"] = dose
    with transaction(sessions) as s:
        exceptions.decide(
            s,
            exc_id,
            s.get(User, users["rita"].id),
            exceptions.DecisionInput(
                "resubmit_corrected", reason="dose typo", payload=json.dumps(edited, indent=2)
            ),
        )
    return exc_id


def focused_text(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.textContent.trim()")


def test_the_leads_flow_one_changed_path_focus_moves_on_and_a_concurrent_approval_is_a_409_in_place(
    page, live_server, users, sessions
):
    first = corrected_replay(sessions, users)
    second = corrected_replay(sessions, users, dose="3 tablets daily")
    login(page, live_server, "lena")
    page.goto(f"{live_server}/approvals?sort=age")
    page.click(f"[data-review-link='{first}']")
    panel = page.locator("#review-panel")
    changes = panel.locator("ol.change-list li.change")
    expect(changes).to_have_count(1)  # a one-field correction is one changed path, old and new
    expect(changes).to_contain_text("MedicationRequest.dosageInstruction[0].text")
    expect(changes.locator("del")).to_have_text(re.compile(r'"1 tablet daily"'))
    expect(changes.locator("ins")).to_have_text(re.compile(r'"2 tablets daily"'))
    expect(page).to_have_url(re.compile(rf"/approvals/{first}\?sort=age$"))  # a link to this item

    panel.locator("input[name=password]").fill(PASSWORD)
    panel.get_by_role("button", name="Approve replay").click()
    expect(panel.locator("[data-approval-done]")).to_contain_text(f"#{first} approved")
    expect(panel.locator("#review-h")).to_have_text(f"Exception #{second}")
    expect(panel.locator("#review-h")).to_be_focused()  # the next item, where the user looks
    expect(page.locator(f"#approval-row-{first}")).to_have_count(0)
    expect(page.locator(f"#approval-row-{second}")).to_have_class(re.compile("current"))

    panel.locator("input[name=password]").fill(PASSWORD)
    with transaction(sessions) as s:  # leo approves the second one through the service meanwhile
        exceptions.decide(
            s, second, s.get(User, users["leo"].id), exceptions.DecisionInput("approve", password=PASSWORD)
        )
        at = s.query(Replay.approved_at).filter(Replay.exception_id == second).scalar()
    panel.get_by_role("button", name="Approve replay").click()
    alert = panel.get_by_role("alert")
    expect(alert).to_have_text(f"Not done: this replay was already approved by leo at {at:%H:%M} UTC.")
    expect(alert).to_be_focused()


def test_back_after_an_htmx_filter_restores_a_styled_whole_page(page, live_server, users, sessions):
    exc_id = corrected_replay(sessions, users)
    login(page, live_server, "lena")
    page.goto(f"{live_server}/approvals")
    page.select_option("select[name=sort]", "age")  # htmx swaps the list and pushes the URL
    expect(page).to_have_url(re.compile(r"/approvals\?.*sort=age"))
    page.click(f"[data-review-link='{exc_id}']")  # htmx swaps the panel and pushes its URL
    expect(page).to_have_url(re.compile(rf"/approvals/{exc_id}\?sort=age$"))
    page.goto(f"{live_server}/replays")  # a whole page
    for expected in (rf"/approvals/{exc_id}\?sort=age$", r"/approvals\?.*sort=age$"):
        page.go_back()
        expect(page).to_have_url(re.compile(expected))
        expect(page.locator("header.topbar")).to_be_visible()  # the whole page, not a fragment
        expect(page.locator("h1")).to_contain_text("Approvals")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(245, 246, 248)"
    # htmx keeps no snapshot of these pages (they show payload values) in the browser's storage
    assert page.evaluate("sessionStorage.getItem('htmx-history-cache')") is None


def test_a_session_ended_mid_action_goes_to_login_and_back_to_the_item(page, live_server, users, sessions):
    exc_id = corrected_replay(sessions, users)
    login(page, live_server, "lena")
    page.goto(f"{live_server}/approvals")
    page.click(f"[data-review-link='{exc_id}']")
    page.locator("#review-panel input[name=password]").fill(PASSWORD)
    with transaction(sessions) as s:  # e.g. logged out in another tab
        end_sessions(s.get(User, users["lena"].id))
    page.get_by_role("button", name="Approve replay").click()
    expect(page).to_have_url(re.compile(r"/login\?next="))
    expect(page.locator("#review-panel")).to_have_count(0)  # the login page is the page, not a fragment
    page.fill("input[name=username]", "lena")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(rf"/approvals/{exc_id}$"))
    expect(page.locator(f"#approval-{exc_id} input[name=password]")).to_be_visible()  # nothing approved
