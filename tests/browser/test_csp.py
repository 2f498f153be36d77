"""Issue 7, Headers: the console works in Chromium under its Content-Security-Policy (no eval,
no inline script or style): no page logs a CSP violation or a script error, and htmx still
swaps fragments (the correction editor's live diff)."""

import json

import pytest
from playwright.sync_api import expect

from tests.conftest import PASSWORD
from tests.factories import make_exception, setup_connection

pytestmark = pytest.mark.browser


def test_console_pages_run_under_the_csp(page, live_server, users, sessions):
    setup_connection(sessions)
    exc_id = make_exception(sessions, users["svc"], key="csp-1")
    problems: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(m.text) if "Content Security Policy" in m.text or "Refused" in m.text else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    failed: list[str] = []  # the pages' own requests (a browser's favicon probe is not one)
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)

    page.goto(f"{live_server}/login")
    response = page.request.get(f"{live_server}/login")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.fill("input[name=username]", "rita")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".whoami")).to_contain_text("rita")
    for path in ("/", "/queues/all", f"/exceptions/{exc_id}", "/replays"):
        page.goto(f"{live_server}{path}")
        expect(page.locator("main")).to_be_visible()

    # htmx under the CSP: the correction editor's preview swaps the diff fragment in place
    page.goto(f"{live_server}/exceptions/{exc_id}/correct")
    payload = json.loads(page.input_value("#payload"))
    payload["note"] = [{"text": "checked under CSP"}]
    page.fill("#payload", json.dumps(payload, indent=2))
    page.evaluate("document.body.dataset.samePage = 'yes'")  # gone if the browser navigates
    page.click("button[name=preview], input[name=preview]")
    expect(page.locator("#diff")).to_contain_text("checked under CSP")
    assert page.evaluate("document.body.dataset.samePage") == "yes"  # swapped, not navigated
    assert problems == [] and failed == []
