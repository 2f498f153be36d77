"""SPEC 3.1/5 Approvals: four-eyes with password re-entry, reject with reason; replay progress."""

from __future__ import annotations

import html as html_lib
import re

import sqlalchemy as sa

from app.db.models import ExceptionItem, Replay
from app.db.session import transaction
from tests.conftest import PASSWORD
from tests.factories import medication_request


def state_of(sessions, exc_id):
    with transaction(sessions) as s:
        return s.get(ExceptionItem, exc_id).state


def request_replay(login, post, make, *, who="lena", corrected=False) -> int:
    exc_id = make()
    login(who)
    if corrected:
        data = {"payload": medication_request(code="999999"), "reason": "wrong code", "submit": "1"}
        assert post(f"/exceptions/{exc_id}/correct", data).status_code == 303
    else:
        assert (
            post(f"/exceptions/{exc_id}/decide", {"action": "resubmit", "reason": "EHR fixed"}).status_code
            == 303
        )
    return exc_id


def test_approvals_page_lists_pending_replays_with_requester_reason_and_diff(login, post, make, client):
    exc_id = request_replay(login, post, make, who="rita", corrected=True)
    html = html_lib.unescape(login("lena").get("/approvals").get_data(as_text=True))
    card = re.search(
        rf'<article class="panel approval" id="approval-{exc_id}">.*?</article>', html, re.S
    ).group(0)
    assert "<dd data-requester>rita" in card and "wrong code" in card
    assert re.search(r'<span class="d-add">\+\s+"code": "999999",?</span>', card)
    assert 'name="password"' in card


def test_approvals_page_is_empty_when_nothing_waits(login):
    assert "Nothing is waiting for approval" in login("lena").get("/approvals").get_data(as_text=True)


def test_self_approval_is_refused_403_through_the_console(login, post, make, sessions, audit_events):
    exc_id = request_replay(login, post, make, who="lena")
    html = login("lena").get("/approvals").get_data(as_text=True)
    assert "another clinical lead must approve it" in html  # no approve button for your own request
    response = post(
        f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD, "expected_version": "2"}
    )
    assert response.status_code == 403
    assert "four-eyes: you cannot approve your own replay request" in response.get_data(as_text=True)
    assert state_of(sessions, exc_id) == "pending_approval"
    assert audit_events(action="decision.approve") == []


def test_approve_with_a_wrong_password_is_refused(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(f"/approvals/{exc_id}", {"action": "approve", "password": "not my password"})
    assert response.status_code == 403 and "password" in response.get_data(as_text=True)
    assert state_of(sessions, exc_id) == "pending_approval"


def test_approve_with_password_queues_the_replay(login, post, make, sessions, audit_events):
    exc_id = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(
        f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD, "expected_version": "2"}
    )
    assert response.status_code == 303
    assert state_of(sessions, exc_id) == "replaying"
    with transaction(sessions) as s:
        replay = s.scalar(sa.select(Replay).where(Replay.exception_id == exc_id))
        assert replay.state == "queued" and replay.approved_by.username == "lena"
    [event] = audit_events(action="decision.approve")
    assert event.actor == "lena" and event.details["requested_by"] == "rita"


def test_reject_needs_a_reason_and_returns_the_item_to_its_queue(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    login("leo")
    response = post(f"/approvals/{exc_id}", {"action": "reject"})
    assert response.status_code == 422 and "reject needs a reason" in response.get_data(as_text=True)
    assert post(f"/approvals/{exc_id}", {"action": "reject", "reason": "wrong patient"}).status_code == 303
    assert state_of(sessions, exc_id) == "open"


def test_approving_a_changed_item_is_a_409(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(
        f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD, "expected_version": "1"}
    )
    assert response.status_code == 409 and "changed since you loaded it" in response.get_data(as_text=True)


def test_approve_from_the_detail_page_too(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    client = login("leo")
    html = client.get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert 'value="approve"' in html and 'value="reject"' in html
    response = post(f"/exceptions/{exc_id}/decide", {"action": "approve", "password": PASSWORD})
    assert response.status_code == 303 and state_of(sessions, exc_id) == "replaying"


# --- replays -----------------------------------------------------------------------------------------


def test_replays_page_shows_progress_and_polls_only_while_running(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    client = login("lena")
    idle = client.get("/replays", headers={"HX-Request": "true"})
    assert idle.status_code == 286  # nothing running: htmx stops polling
    assert 'hx-trigger="every' not in idle.get_data(as_text=True)

    post(f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD})
    page = client.get("/replays")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "<html" in html
    assert 'hx-trigger="every 2s"' in html and 'data-running="1"' in html
    row = re.search(r'<tr class="replay-queued">.*?</tr>', html, re.S).group(0)
    assert f"#{exc_id}" in row and "rita" in row and "lena" in row
    polling = client.get("/replays", headers={"HX-Request": "true"})
    assert polling.status_code == 200 and "<html" not in polling.get_data(as_text=True)

    with transaction(sessions) as s:  # the worker finishes it
        s.execute(
            sa.update(Replay)
            .where(Replay.exception_id == exc_id)
            .values(state="succeeded", result="delivered")
        )
    done = client.get("/replays", headers={"HX-Request": "true"})
    assert done.status_code == 286 and "delivered" in done.get_data(as_text=True)
