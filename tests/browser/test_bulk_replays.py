"""Bulk replay pages in a real browser (issue 6): a reviewer requests a replay of the selected
rows from the queue, a clinical lead approves the batch once; the pages fit 390 px and pass axe
(labels, headings, contrast) — the list, the request, and the detail with its live progress."""

from __future__ import annotations

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect

from tests.conftest import PASSWORD
from tests.factories import make_exception, setup_connection

from .test_console_loop import login, logout

pytestmark = pytest.mark.browser


def fits_and_passes_axe(page) -> None:
    # Measured once the page has loaded and settled (a loaded CI machine once measured mid-layout);
    # a real overflow persists and still fails.
    page.wait_for_load_state("load")
    width = page.evaluate("document.documentElement.scrollWidth")
    for _ in range(10):
        if width <= 390:
            break
        page.wait_for_timeout(200)
        width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, page.url
    results = Axe().run(page)
    assert results.violations_count == 0, results.generate_report()


def test_bulk_replay_pages_fit_a_phone_and_pass_axe(page, live_server, users, sessions):
    setup_connection(sessions)
    ids = [make_exception(sessions, users["svc"]) for _ in range(3)]
    page.set_viewport_size({"width": 390, "height": 844})

    login(page, live_server, "rita")
    page.goto(f"{live_server}/queues")
    for exc_id in ids:
        page.check(f"input[name=ids][value^='{exc_id}:']")
    bulk = page.locator("details:has(#bulk-form)")
    if bulk.get_attribute("open") is None:  # folded on a phone
        bulk.locator("summary").click()
    page.select_option("select[name=action]", "resubmit")
    page.fill("[data-bulk-reason]", "EHR fixed its code table")
    page.click("text=Review bulk action")
    page.click("button[formaction$='/bulk-replays/new']")
    expect(page.locator("[data-bulk-total]")).to_have_text("3")
    fits_and_passes_axe(page)
    page.click("button.primary")
    expect(page.locator("[data-batch-state]")).to_have_text("requested")
    fits_and_passes_axe(page)
    logout(page)

    login(page, live_server, "lena")
    page.goto(f"{live_server}/bulk-replays")
    fits_and_passes_axe(page)
    page.click("table a")
    page.fill("#approve-password", PASSWORD)
    page.click("text=Approve all 3")
    expect(page.locator("[data-batch-state]")).to_have_text("approved")
    # the progress section polls itself (htmx, every 2 s) while the batch moves
    assert page.locator("#bulk-progress[hx-trigger='every 2s']").count() == 1
    fits_and_passes_axe(page)
