"""Issue 8, queues that stay live, in a real Chromium: a failure reported through the API appears
in an open queue page, with a "new" mark and an announcement, and in the sidebar count within the
stated interval, while the checked row stays checked; the bulk confirmation's way back keeps the
filter that was applied in place."""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import expect

from tests.factories import medication_request

from .console_data import build_estate, login

pytestmark = pytest.mark.browser

LIVE_INTERVAL_S = 5  # the poll in templates/queues/index.html (hx-trigger="every 5s")


@pytest.fixture
def estate(sessions, users):
    return build_estate(sessions, users)


def test_a_failure_reported_through_the_api_appears_in_an_open_queue_keeping_the_selection(
    page, live_server, users, estate
):
    login(page, live_server, "rita")
    page.goto(f"{live_server}/queues/ehr_rejected")
    sidebar = page.locator('#queue-counts [data-count="ehr_rejected"]')
    before = int(re.match(r"\d+", sidebar.inner_text()).group(0))
    rows_before = page.locator("tr[data-row]").count()
    first = page.locator("tr[data-row] input[name=ids]").first
    # By keyboard (issue 8: "37 Tabs to the first row"): Tab, Enter on "Skip to results", two Tabs.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to results"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(first).to_be_focused()
    # j/k move between rows, x selects the current one, ? lists the shortcuts.
    page.keyboard.press("j")
    expect(page.locator("tr[data-row] [data-row-link]").nth(1)).to_be_focused()
    page.keyboard.press("k")
    expect(page.locator("tr[data-row] [data-row-link]").first).to_be_focused()
    page.keyboard.press("x")
    expect(first).to_be_checked()
    expect(page.locator("[data-bulk-count]")).to_have_text("1 selected")
    page.keyboard.press("?")
    expect(page.locator("dialog#shortcuts")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("dialog#shortcuts")).to_be_hidden()
    page.evaluate("window.scrollTo(0, 0); document.body.dataset.samePage = 'yes'")

    response = report_failure(page, live_server, users, "live-update-1")
    assert response.status == 202, response.text()
    new_id = response.json()["exception_id"]
    assert response.json()["category"] == "ehr_rejected"
    reported = time.monotonic()

    row = page.locator(f"#ex-{new_id}")
    expect(row).to_be_visible(timeout=(LIVE_INTERVAL_S + 3) * 1000)
    appeared = time.monotonic() - reported
    expect(row.locator(".badge-new")).to_have_text("new")
    expect(sidebar).to_contain_text(str(before + 1))
    assert page.locator("tr[data-row]").count() == rows_before + 1
    expect(first).to_be_checked()  # the selection survived the refresh
    expect(page.locator("[data-bulk-count]")).to_have_text("1 selected")
    expect(page.locator("#live-status")).to_contain_text("1 new item")
    assert page.evaluate("document.body.dataset.samePage") == "yes"  # refreshed in place, not reloaded
    assert appeared <= LIVE_INTERVAL_S + 3, appeared

    # The bulk confirmation's way back keeps the filter applied in place (htmx, URL pushed).
    page.select_option("form.filters select[name=state]", "open")
    page.click("form.filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"state=open"))
    expect(first).to_be_checked()  # a filter swap keeps the selection too
    page.click("#bulk-form button[type=submit]:not([formaction])")
    expect(page.locator("[data-bulk-total]")).to_have_text("1")
    back = page.get_by_role("link", name="Cancel")
    assert "state=open" in back.get_attribute("href")

    # o opens the current row; on the exception, d puts focus in the discard form (nothing sent).
    page.goto(f"{live_server}/queues/ehr_rejected")
    page.keyboard.press("j")
    page.keyboard.press("o")
    page.wait_for_url(re.compile(r"/exceptions/\d+$"), wait_until="load")  # its scripts run
    page.keyboard.press("d")
    expect(page.locator("form.action-discard :focus")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"/exceptions/\d+$"))

    # The dashboard refreshes its figures by itself too.
    page.goto(f"{live_server}/")
    active = page.locator('[data-kpi="active"]')
    before_active = int(active.inner_text())
    assert report_failure(page, live_server, users, "live-update-2").status == 202
    expect(active).to_have_text(str(before_active + 1), timeout=(LIVE_INTERVAL_S + 3) * 1000)


def report_failure(page, live_server: str, users, key: str):
    """An interface engine reports a failed message through the API (an exception at once)."""
    return page.request.post(
        f"{live_server}/api/v1/exceptions",
        headers={
            "Authorization": f"Bearer {users['svc_token']}",
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        },
        data=json.dumps(
            {
                "connection": "mercy-epic",
                "message_type": "MedicationRequest",
                "payload": medication_request(),
                "content_type": "application/fhir+json",
                "error": "HTTP 422 from the EHR: OperationOutcome code-invalid",
            }
        ),
    )
