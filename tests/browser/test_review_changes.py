"""Issue 8 in a real browser: the correction editor's "jump to" link moves the caret and the scroll
to the failing line, and the clinical lead's approvals page shows the change list first, the full
diff on demand."""

import json
import re

import pytest
from playwright.sync_api import expect

from tests.factories import make_exception

from .test_console_loop import login, logout

pytestmark = pytest.mark.browser

# Long enough that the editor must scroll: `subject` sorts after forty notes.
RESOURCE = {
    "resourceType": "MedicationRequest",
    "status": "active",
    "intent": "order",
    "subject": {"reference": "Patient/123456"},
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "313782"}]
    },
    "note": [{"text": f"note {i}"} for i in range(40)],
}
ISSUE = {
    "severity": "error",
    "code": "not-found",
    "diagnostics": "unknown patient",
    "expression": ["MedicationRequest.subject.reference"],
}


def test_jump_to_moves_the_caret_to_the_failing_line_and_the_approver_sees_the_change_list(
    page, live_server, users, sessions
):
    payload = json.dumps(RESOURCE, separators=(",", ":"))
    exc_id = make_exception(sessions, users["svc"], payload=payload, issues=[ISSUE])
    login(page, live_server, "rita")
    page.goto(f"{live_server}/exceptions/{exc_id}/correct")
    editor = page.locator("textarea#payload")
    expect(editor).to_have_value(re.compile(r'^\{\n  "resourceType": "MedicationRequest",\n'))
    assert editor.evaluate("el => el.scrollTop") == 0

    link = page.get_by_role("link", name=re.compile(r"Jump to line \d+ in the editor"))
    line = int(link.get_attribute("data-jump-line"))
    lines = editor.input_value().split("\n")
    assert lines[line - 1].strip() == '"reference": "Patient/123456"' and line > 100
    expect(page.locator(".issue-target pre.excerpt .ln.hl")).to_contain_text('"reference": "Patient/123456"')

    link.click()
    expect(editor).to_be_focused()
    start = sum(len(text) + 1 for text in lines[: line - 1])
    selection = editor.evaluate("el => [el.selectionStart, el.selectionEnd]")
    assert selection == [start, start + len(lines[line - 1])]
    top, height, line_height = editor.evaluate(
        "el => [el.scrollTop, el.clientHeight, parseFloat(getComputedStyle(el).lineHeight)]"
    )
    assert top > 0 and top <= (line - 1) * line_height < top + height  # the line is in view

    # The reviewer fixes the reference and asks for the corrected replay.
    editor.fill(editor.input_value().replace("Patient/123456", "Patient/654321"))
    page.locator("textarea#reason").fill("wrong patient reference")
    page.get_by_role("button", name="Request replay with this correction").click()
    expect(page.locator(".flash-success")).to_contain_text("Corrected replay requested")
    logout(page)

    login(page, live_server, "lena")
    page.goto(f"{live_server}/approvals/{exc_id}")
    card = page.locator(f"#approval-{exc_id}")
    changes = card.locator("ol.change-list li.change")
    expect(changes).to_have_count(1)
    expect(changes).to_contain_text("MedicationRequest.subject.reference")
    expect(changes.locator("del")).to_contain_text('"Patient/123456"')
    expect(changes.locator("ins")).to_contain_text('"Patient/654321"')
    diff = card.locator("details.full-diff pre.code")
    expect(diff).to_be_hidden()
    card.get_by_text("Show full diff").click()
    expect(diff).to_be_visible()
    expect(diff.locator(".d-add")).to_have_text(['+    "reference": "Patient/654321"'])
    # On a phone the change list and the diff wrap or scroll inside themselves, never the page.
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    expect(card.locator("ol.change-list li.change")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_the_correction_editor_fits_a_phone(page, live_server, users, sessions):
    payload = json.dumps(RESOURCE, separators=(",", ":"))
    exc_id = make_exception(sessions, users["svc"], payload=payload, issues=[ISSUE])
    page.set_viewport_size({"width": 390, "height": 844})
    login(page, live_server, "rita")
    page.goto(f"{live_server}/exceptions/{exc_id}/correct")
    expect(page.locator(".issue-target pre.excerpt .ln.hl")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
