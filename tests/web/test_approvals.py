"""SPEC 3.1/5 Approvals: four-eyes with password re-entry, reject with reason; replay progress."""

from __future__ import annotations

import html as html_lib
import re
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import ExceptionItem, Replay, User
from app.db.session import transaction
from app.services import exceptions
from app.services.clock import utcnow
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


HX = {"HX-Request": "true"}


def panel_of(html: str, exc_id: int) -> str:
    return re.search(rf'<article class="approval" id="approval-{exc_id}".*?</article>', html, re.S).group(0)


def test_the_list_shows_each_waiting_item_and_reads_no_payload(login, post, make, audit_events):
    exc_id = request_replay(login, post, make, who="rita", corrected=True)
    html = html_lib.unescape(login("lena").get("/approvals").get_data(as_text=True))
    row = re.search(rf'<tr id="approval-row-{exc_id}".*?</tr>', html, re.S).group(0)
    assert "rita" in row and "Mercy Health" in row and "mercy-epic" in row and "ehr rejected" in row
    assert f'href="/approvals/{exc_id}"' in row and f'hx-get="/approvals/{exc_id}"' in row
    assert "999999" not in html and "change-list" not in html  # no payload on the list
    assert "Choose an item in the list" in html


def test_the_list_records_no_phi_view_and_the_panel_records_exactly_one(login, post, make, audit_events):
    exc_id = request_replay(login, post, make, who="rita", corrected=True)
    client = login("lena")
    views_before = len(audit_events(action="phi.view"))
    for _ in range(3):
        assert client.get("/approvals").status_code == 200
        assert client.get("/approvals?sort=age", headers=HX).status_code == 200
    assert len(audit_events(action="phi.view")) == views_before

    response = client.get(f"/approvals/{exc_id}", headers=HX)
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 200 and "<html" not in html  # the panel alone
    panel = panel_of(html, exc_id)
    assert "<dd data-requester>rita" in panel and "wrong code" in panel
    assert re.search(r'<span class="d-add">\+\s+"code": "999999",?</span>', panel)
    assert panel.index("change-list") < panel.index("<dl")  # the change list first
    assert 'name="password"' in panel
    views = audit_events(action="phi.view")[views_before:]
    assert [(e.actor, e.details["channel"], e.subject_id) for e in views] == [
        ("lena", "console-approvals", str(exc_id))
    ]


def test_the_panel_link_without_javascript_is_the_queue_page_with_the_panel_open(login, post, make):
    exc_id = request_replay(login, post, make, who="rita")
    html = login("lena").get(f"/approvals/{exc_id}").get_data(as_text=True)
    assert "<html" in html and f'id="approval-row-{exc_id}" class="current"' in html
    assert f'id="approval-{exc_id}"' in html


def test_the_list_filters_and_sorts_through_the_query_string(login, post, make, sessions):
    first = request_replay(login, post, make, who="rita")
    other = make(connection="lakeside-cerner", category="transport")
    login("rita")
    post(f"/exceptions/{other}/decide", {"action": "resubmit", "reason": "EHR back"})
    with transaction(sessions) as s:  # the second item's SLA falls due first; its request is newer
        s.get(ExceptionItem, other).sla_due_at = s.get(ExceptionItem, first).sla_due_at - timedelta(hours=1)
    client = login("lena")

    def rows(url):
        return [
            int(i) for i in re.findall(r'id="approval-row-(\d+)"', client.get(url).get_data(as_text=True))
        ]

    assert rows("/approvals") == [other, first]  # SLA due first
    assert rows("/approvals?sort=age") == [first, other]  # oldest request first
    assert rows("/approvals?connection=lakeside-cerner") == [other]
    assert rows("/approvals?category=ehr_rejected") == [first]
    assert rows("/approvals?customer=Nobody") == []
    filtered = client.get("/approvals?connection=mercy-epic", headers=HX).get_data(as_text=True)
    assert "<html" not in filtered and f'href="/approvals/{first}?connection=mercy-epic"' in filtered


def test_approve_in_place_answers_with_the_next_items_panel_and_the_list_without_it(
    login, post, make, sessions
):
    first = request_replay(login, post, make, who="rita")
    second = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(
        f"/approvals/{first}?sort=age",
        {"action": "approve", "password": PASSWORD, "expected_version": "2"},
        headers=HX,
    )
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 200 and "<html" not in html
    assert f"Replay of exception #{first} approved" in html
    assert f'id="approval-{second}"' in html  # the next item's panel
    assert f'action="/approvals/{second}?sort=age"' in html  # still the lead's view
    oob = re.search(r'<div id="approval-list"[^>]*hx-swap-oob="true".*?</table>', html, re.S).group(0)
    assert f"approval-row-{first}" not in oob and f"approval-row-{second}" in oob
    assert state_of(sessions, first) == "replaying"

    last = post(f"/approvals/{second}?sort=age", {"action": "reject", "reason": "wrong patient"}, headers=HX)
    assert "Queue empty" in last.get_data(as_text=True)


def test_a_concurrent_approval_is_a_409_naming_the_other_approver_and_the_time(
    login, post, make, sessions, users
):
    exc_id = request_replay(login, post, make, who="rita")
    with transaction(sessions) as s:  # leo approves first, through the service
        exceptions.decide(
            s, exc_id, s.get(User, users["leo"].id), exceptions.DecisionInput("approve", password=PASSWORD)
        )
        at = s.scalar(sa.select(Replay.approved_at).where(Replay.exception_id == exc_id))
    login("lena")
    response = post(
        f"/approvals/{exc_id}",
        {"action": "approve", "password": PASSWORD, "expected_version": "2"},
        headers=HX,
    )
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 409
    alert = re.search(r'<p class="flash flash-error" role="alert"[^>]*>(.*?)</p>', html, re.S).group(1)
    assert alert == f"Not done: this replay was already approved by leo at {at:%H:%M} UTC."
    assert 'name="password"' not in html  # nothing left to approve


def test_a_stale_form_is_a_409_that_keeps_the_typed_reason_and_says_who_changed_it(login, post, make):
    exc_id = request_replay(login, post, make, who="rita")
    login("leo")
    post(f"/exceptions/{exc_id}/decide", {"action": "comment", "reason": "checked the order"})
    login("lena")
    response = post(
        f"/approvals/{exc_id}",
        {"action": "reject", "reason": "dose looks wrong", "expected_version": "2"},
        headers=HX,
    )
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 409
    assert "changed since you loaded it" in html and "commented on by leo at" in html
    assert re.search(r'<textarea name="reason"[^>]*>dose looks wrong</textarea>', html)


def test_a_422_keeps_the_typed_note(login, post, make):
    exc_id = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(
        f"/approvals/{exc_id}",
        {"action": "approve", "password": PASSWORD, "reason": "looks right", "expected_version": "x"},
        headers=HX,
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 422 and 'role="alert"' in html
    assert 'name="reason" maxlength="2000" value="looks right"' in html
    assert PASSWORD not in html  # the password is never sent back


def test_approvals_page_is_empty_when_nothing_waits(login):
    assert "Nothing is waiting for approval" in login("lena").get("/approvals").get_data(as_text=True)


def test_self_approval_is_refused_403_through_the_console(login, post, make, sessions, audit_events):
    exc_id = request_replay(login, post, make, who="lena")
    html = login("lena").get(f"/approvals/{exc_id}", headers=HX).get_data(as_text=True)
    assert "another clinical lead must approve it" in html  # no approve button for your own request
    assert 'value="approve"' not in html
    response = post(
        f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD, "expected_version": "2"}
    )
    assert response.status_code == 403
    assert "four-eyes: you cannot approve your own replay request" in response.get_data(as_text=True)
    assert state_of(sessions, exc_id) == "pending_approval"
    assert audit_events(action="decision.approve") == []


def test_a_locked_lead_sees_a_notice_instead_of_the_approve_button(login, post, make, sessions, users):
    exc_id = request_replay(login, post, make, who="rita")
    with transaction(sessions) as s:
        s.get(User, users["lena"].id).approval_locked_at = utcnow()
    html = html_lib.unescape(login("lena").get(f"/approvals/{exc_id}", headers=HX).get_data(as_text=True))
    notice = re.search(r"<p class=\"callout warn\" data-approve-blocked>(.*?)</p>", html, re.S).group(1)
    assert "your approvals are locked" in notice and "ask an administrator" in notice
    assert 'value="approve"' not in html and 'value="reject"' in html


def test_approve_with_a_wrong_password_is_refused(login, post, make, sessions):
    exc_id = request_replay(login, post, make, who="rita")
    login("lena")
    response = post(f"/approvals/{exc_id}", {"action": "approve", "password": "not my password"})
    html = response.get_data(as_text=True)
    alert = re.search(r'role="alert"[^>]*>(.*?)</p>', html, re.S).group(1)
    assert response.status_code == 403
    assert alert == "Wrong password. Re-enter your own login password to approve."
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
