"""Issue 5 in a real browser: an interface engine reports a failed ADT^A08 through the API; a
reviewer opens it, sees the field table masked with the flagged field, asks for the full payload
(audited), reads the highlighted PID-7 row and switches to the raw message."""

import re

import pytest
import sqlalchemy as sa
from playwright.sync_api import expect

from app.db.models import AuditEvent
from app.db.session import transaction
from tests.factories import setup_connection
from tests.web.test_hl7_view import ADT_A08, ENGINE_ERROR, HL7

from .test_console_loop import login

pytestmark = pytest.mark.browser


def report_adt(client, users, sessions) -> int:
    setup_connection(sessions, name="mercy-mllp", protocol="hl7v2-mllp")
    r = client.post(
        "/api/v1/exceptions",
        json={
            "connection": "mercy-mllp",
            "message_type": "ADT^A08",
            "content_type": HL7,
            "payload": ADT_A08,
            "error": ENGINE_ERROR,
        },
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "browser-hl7-1"},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json["exception_id"]


def test_reviewer_reads_the_field_table_the_flagged_row_and_the_raw_message(
    page, live_server, client, users, sessions
):
    exc_id = report_adt(client, users, sessions)
    login(page, live_server, "rita")
    page.goto(f"{live_server}/queues/ehr_rejected")
    page.click(f"a[href='/exceptions/{exc_id}']")

    # masked first: the flagged row is there, the patient is not
    payload = page.locator("#payload")
    flagged = payload.locator("table.hl7 tr.hl")
    expect(flagged).to_have_count(1)
    expect(flagged).to_contain_text("PID-7")
    expect(flagged).to_contain_text("error here")
    expect(payload).not_to_contain_text("NUÑEZ")

    # the full payload, through htmx: names, the same flagged row, and one PHI view recorded
    payload.get_by_text("Show full payload (audited)").click()
    pid5 = page.locator("table.hl7 tr", has=page.locator("td", has_text=re.compile(r"^PID-5$")))
    expect(pid5).to_contain_text("Patient Name")
    expect(pid5).to_contain_text("NUÑEZ")
    flagged = page.locator("table.hl7 tr.hl")
    expect(flagged).to_have_count(1)
    expect(flagged).to_contain_text("PID-7")
    expect(flagged).to_be_visible()
    with transaction(sessions, read_only=True) as s:
        views = s.scalars(sa.select(AuditEvent.actor).where(AuditEvent.action == "phi.view")).all()
    assert views == ["rita"]

    # the raw message is a tab next to the table: control characters visible, keyboard-scrollable
    raw = page.locator("pre.hl7-raw")
    expect(raw).to_be_hidden()
    page.get_by_label("Raw message").check()
    expect(raw).to_be_visible()
    expect(page.locator("table.hl7")).to_be_hidden()
    expect(raw).to_contain_text("PID|1||MRN-00042^^^MERCY^MR~PAT-77")
    expect(raw.locator("abbr.ctl").first).to_have_text("<CR>")
    expect(raw).to_have_attribute("tabindex", "0")
    page.get_by_label("Field table").check()
    expect(page.locator("table.hl7")).to_be_visible()


def test_the_viewer_fits_a_phone_sized_page(page, live_server, client, users, sessions):
    exc_id = report_adt(client, users, sessions)
    page.set_viewport_size({"width": 390, "height": 844})
    login(page, live_server, "rita")
    page.goto(f"{live_server}/exceptions/{exc_id}?payload=1")
    expect(page.locator("table.hl7 tr.hl")).to_be_visible()

    def fits(selector: str) -> bool:
        """Inside the viewport, and nothing in it wider than itself."""
        return page.locator(selector).evaluate(
            "el => el.getBoundingClientRect().right <= window.innerWidth && el.scrollWidth <= el.clientWidth"
        )

    assert fits("#payload")
    page.get_by_label("Raw message").check()
    assert fits("#payload")
    # the raw block scrolls inside itself instead
    assert page.locator("pre.hl7-raw").evaluate("el => el.scrollWidth > el.clientWidth")
    # …and so do the versions and audit tables: the page itself never scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
