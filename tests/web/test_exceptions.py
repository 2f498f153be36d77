"""SPEC 5 Exception detail: payload viewer (audited), timeline, actions by state and role, corrections."""

from __future__ import annotations

import html as html_lib
import re

import pytest
import sqlalchemy as sa

from app.db.models import ExceptionItem, Replay
from app.db.session import transaction
from tests.factories import HL7_CONTENT_TYPE, REJECTION_ISSUES, medication_request, setup_connection


def state_of(sessions, exc_id):
    with transaction(sessions) as s:
        return s.get(ExceptionItem, exc_id).state


def action_forms(html: str) -> set[str]:
    return set(re.findall(r'<input type="hidden" name="action" value="(\w+)">', html)) | (
        {"resubmit_corrected"} if "Open the correction editor" in html else set()
    )


def test_detail_page_shows_the_exception_without_the_payload_until_asked(login, make, audit_events):
    exc_id = make(issues=REJECTION_ISSUES)
    html = login("rita").get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert f"Exception #{exc_id}" in html
    assert "Unknown code system http://example.org/icd9" in html  # issues from the latest attempt
    assert "rxnorm" not in html  # payload not shown...
    assert audit_events(action="phi.view") == []  # ...so no PHI view recorded
    assert "Show full payload (audited)" in html


def test_viewing_the_full_payload_writes_an_audit_event(login, make, audit_events):
    exc_id = make()
    html = login("rita").get(f"/exceptions/{exc_id}?payload=1").get_data(as_text=True)
    assert "rxnorm" in html
    [event] = audit_events(action="phi.view")
    assert (event.actor, event.subject_type, event.subject_id) == ("rita", "exception", str(exc_id))
    assert event.details["channel"] == "console"


def test_htmx_payload_fragment_is_audited_too(login, make, audit_events):
    exc_id = make()
    client = login("lena")
    fragment = client.get(f"/exceptions/{exc_id}/payload", headers={"HX-Request": "true"}).get_data(
        as_text=True
    )
    assert fragment.lstrip().startswith('<section id="payload"') and "rxnorm" in fragment
    assert [e.actor for e in audit_events(action="phi.view")] == ["lena"]
    # Without htmx the same URL sends the browser to the page that shows it.
    response = client.get(f"/exceptions/{exc_id}/payload")
    assert response.status_code == 302 and "payload=1" in response.headers["Location"]


def test_fhir_payload_highlights_the_lines_the_operation_outcome_points_at(login, make):
    exc_id = make(issues=REJECTION_ISSUES)
    html = html_lib.unescape(login("rita").get(f"/exceptions/{exc_id}?payload=1").get_data(as_text=True))
    highlighted = re.findall(r'<span class="ln hl" data-issues="1"[^>]*>([^<]*)<mark', html)
    assert (
        len(highlighted) == 1 and '"system": "http://www.nlm.nih.gov/research/umls/rxnorm"' in highlighted[0]
    )
    issue_row = re.search(r'<tr class="issue sev-error">.*?</tr>', html, re.S).group(0)
    for text in (
        "error",
        "code-invalid",
        "Unknown code system",
        "MedicationRequest.medicationCodeableConcept",
    ):
        assert text in issue_row


def test_hl7_payload_is_a_segment_and_field_table_with_field_names(login, sessions, users):
    from tests.factories import make_exception

    setup_connection(sessions, name="mercy-mllp", protocol="hl7v2-mllp")
    exc_id = make_exception(
        sessions,
        users["svc"],
        connection="mercy-mllp",
        message_type="ORU^R01",
        content_type=HL7_CONTENT_TYPE,
        issues=[
            {"severity": "error", "code": "207", "diagnostics": "bad patient id", "expression": ["PID-3"]}
        ],
    )
    html = login("rita").get(f"/exceptions/{exc_id}?payload=1").get_data(as_text=True)
    assert '<table class="hl7">' in html
    for field, name in (
        ("MSH-9", "Message Type"),
        ("MSH-10", "Message Control ID"),
        ("PID-5", "Patient Name"),
        ("OBX-5", "Observation Value"),
    ):
        assert re.search(rf'<td class="mono">{field}</td>\s*<td>{name}</td>', html), field
    flagged = re.search(r'<tr class="hl"[^>]*>.*?</tr>', html, re.S).group(0)
    assert "PID-3" in flagged and "123456" in flagged


@pytest.mark.parametrize(
    "name, expected",
    [
        ("rita", {"resubmit", "resubmit_corrected", "escalate", "discard", "comment", "assign", "claim"}),
        ("lena", {"resubmit", "resubmit_corrected", "discard", "comment", "assign", "claim"}),
        ("audrey", set()),
    ],
)
def test_action_forms_follow_state_and_role(login, make, name, expected):
    exc_id = make()
    html = login(name).get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert action_forms(html) == expected


def test_every_action_form_posts_with_and_without_htmx(login, make):
    exc_id = make()
    html = login("rita").get(f"/exceptions/{exc_id}").get_data(as_text=True)
    forms = re.findall(r'<form class="action[^"]*" method="post"[^>]*>', html)
    assert forms
    for form in forms:
        assert (
            f'action="/exceptions/{exc_id}/decide"' in form
            and f'hx-post="/exceptions/{exc_id}/decide"' in form
        )


def test_escalate_through_the_console(login, make, post, sessions, audit_events):
    exc_id = make()
    client = login("rita")
    response = post(
        f"/exceptions/{exc_id}/decide",
        {"action": "escalate", "reason": "dose looks wrong", "expected_version": "1"},
    )
    assert response.status_code == 303
    assert state_of(sessions, exc_id) == "escalated"
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "is escalated" in page and "dose looks wrong" in page
    [event] = audit_events(action="decision.escalate")
    assert event.actor == "rita" and event.reason == "dose looks wrong"


def test_stale_expected_version_renders_a_409_conflict_page(login, make, post, sessions):
    exc_id = make()
    login("rita")
    assert (
        post(
            f"/exceptions/{exc_id}/decide", {"action": "comment", "reason": "first", "expected_version": "1"}
        ).status_code
        == 303
    )
    response = post(
        f"/exceptions/{exc_id}/decide", {"action": "escalate", "reason": "second", "expected_version": "1"}
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 409
    assert "changed since you loaded it" in html and f"Exception #{exc_id}" in html
    assert state_of(sessions, exc_id) == "open"


def test_htmx_decision_conflict_returns_the_page_with_409(login, make, post):
    exc_id = make()
    login("rita")
    post(f"/exceptions/{exc_id}/decide", {"action": "comment", "reason": "x", "expected_version": "1"})
    response = post(
        f"/exceptions/{exc_id}/decide",
        {"action": "comment", "reason": "y", "expected_version": "1"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 409 and 'id="main"' in response.get_data(as_text=True)


def test_discard_without_a_reason_code_is_a_422_form_message(login, make, post, sessions):
    exc_id = make()
    login("rita")
    response = post(
        f"/exceptions/{exc_id}/decide", {"action": "discard", "reason": "dup", "expected_version": "1"}
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 422
    assert re.search(r'<p class="form-error" role="alert">discard needs a reason code</p>', html)
    assert state_of(sessions, exc_id) == "open"


def test_discard_other_needs_free_text(login, make, post, sessions):
    exc_id = make()
    login("rita")
    response = post(f"/exceptions/{exc_id}/decide", {"action": "discard", "reason_code": "other"})
    assert response.status_code == 422 and "needs a free-text reason" in response.get_data(as_text=True)
    response = post(
        f"/exceptions/{exc_id}/decide", {"action": "discard", "reason_code": "other", "reason": "test feed"}
    )
    assert response.status_code == 303 and state_of(sessions, exc_id) == "discarded"


def test_unknown_action_and_unknown_reason_code_are_422(login, make, post):
    exc_id = make()
    login("rita")
    assert post(f"/exceptions/{exc_id}/decide", {"action": "explode"}).status_code == 422
    assert (
        post(f"/exceptions/{exc_id}/decide", {"action": "discard", "reason_code": "nope"}).status_code == 422
    )


def test_a_reviewer_cannot_approve_403(login, make, post):
    exc_id = make()
    login("rita")
    post(f"/exceptions/{exc_id}/decide", {"action": "resubmit", "reason": "fixed upstream"})
    response = post(f"/exceptions/{exc_id}/decide", {"action": "approve", "password": "x"})
    assert response.status_code == 403 and "may not approve" in response.get_data(as_text=True)


def test_assign_and_claim(login, make, post, sessions):
    exc_id = make()
    login("rita")
    assert post(f"/exceptions/{exc_id}/decide", {"action": "assign", "assignee": "ravi"}).status_code == 303
    with transaction(sessions) as s:
        assert s.get(ExceptionItem, exc_id).assignee.username == "ravi"
    assert post(f"/exceptions/{exc_id}/decide", {"action": "assign", "assignee": "audrey"}).status_code == 422
    assert post(f"/exceptions/{exc_id}/decide", {"action": "claim"}).status_code == 303
    with transaction(sessions) as s:
        assert s.get(ExceptionItem, exc_id).assignee.username == "rita"


def test_missing_exception_is_404(login):
    assert login("rita").get("/exceptions/999999").status_code == 404


def test_unknown_outcome_without_identifier_search_needs_confirm_not_applied(login, sessions, users, post):
    from tests.factories import make_exception

    setup_connection(sessions, name="legacy", identifier_search=False)
    exc_id = make_exception(sessions, users["svc"], connection="legacy", category="unknown_outcome")
    client = login("rita")
    html = client.get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert "must check the EHR" in html and "resubmit" not in action_forms(html)
    response = post(f"/exceptions/{exc_id}/decide", {"action": "resubmit", "reason": "try again"})
    assert response.status_code == 409 and "confirm_not_applied" in response.get_data(as_text=True)
    client.post(
        "/logout", data={"csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)}
    )
    html = login("lena").get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert "confirm_not_applied" in action_forms(html)
    assert (
        post(
            f"/exceptions/{exc_id}/decide", {"action": "confirm_not_applied", "reason": "checked chart"}
        ).status_code
        == 303
    )
    assert "resubmit" in action_forms(client.get(f"/exceptions/{exc_id}").get_data(as_text=True))


# --- correction editor -----------------------------------------------------------------------------


def test_correction_editor_shows_the_current_payload_and_audits_the_view(login, make, audit_events):
    exc_id = make()
    html = login("rita").get(f"/exceptions/{exc_id}/correct").get_data(as_text=True)
    assert "<textarea" in html and "rxnorm" in html
    assert [e.details["channel"] for e in audit_events(action="phi.view")] == ["console-correct"]


def test_preview_shows_a_unified_diff_against_the_original(login, make, post):
    exc_id = make()
    login("rita")
    edited = medication_request(code="999999")
    html = html_lib.unescape(
        post(
            f"/exceptions/{exc_id}/correct", {"payload": edited, "reason": "", "preview": "Preview diff"}
        ).get_data(as_text=True)
    )
    assert '<span class="d-file">--- version 1 (original)</span>' in html
    assert re.search(r'<span class="d-del">-\s+"code": "313782",?</span>', html)
    assert re.search(r'<span class="d-add">\+\s+"code": "999999",?</span>', html)


def test_diff_endpoint_returns_only_the_fragment(login, make, post):
    exc_id = make()
    login("rita")
    response = post(
        f"/exceptions/{exc_id}/diff",
        {"payload": medication_request(code="111")},
        headers={"HX-Request": "true"},
    )
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 200 and html.lstrip().startswith('<div id="diff"')
    assert '"code": "111"' in html and "<html" not in html


def test_submitting_a_correction_needs_a_reason_and_creates_a_pending_corrected_replay(
    login, make, post, sessions
):
    exc_id = make()
    login("rita")
    edited = medication_request(code="999999")
    response = post(
        f"/exceptions/{exc_id}/correct",
        {"payload": edited, "reason": "", "submit": "1", "expected_version": "1"},
    )
    assert response.status_code == 422 and "a reason is required" in response.get_data(as_text=True)
    response = post(
        f"/exceptions/{exc_id}/correct",
        {"payload": edited, "reason": "wrong RxNorm code", "submit": "1", "expected_version": "1"},
    )
    assert response.status_code == 303
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        replay = s.scalar(sa.select(Replay).where(Replay.exception_id == exc_id))
        assert item.state == "pending_approval" and replay.corrected
        assert '"999999"' in replay.payload_version.text and replay.payload_version.version == 2


def test_a_correction_that_is_not_valid_json_is_refused_422(login, make, post, sessions):
    exc_id = make()
    login("rita")
    response = post(
        f"/exceptions/{exc_id}/correct", {"payload": "{not json", "reason": "oops", "submit": "1"}
    )
    assert response.status_code == 422 and "cannot be used" in response.get_data(as_text=True)
    assert state_of(sessions, exc_id) == "open"


def test_a_stale_correction_is_a_409(login, make, post):
    exc_id = make()
    login("rita")
    post(f"/exceptions/{exc_id}/decide", {"action": "comment", "reason": "x"})
    response = post(
        f"/exceptions/{exc_id}/correct",
        {"payload": medication_request(code="1"), "reason": "r", "submit": "1", "expected_version": "1"},
    )
    assert response.status_code == 409 and "changed since you loaded it" in response.get_data(as_text=True)
