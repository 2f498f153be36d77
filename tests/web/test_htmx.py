"""htmx done right (issue 8): one URL answers a page or a fragment, so responses vary on HX-Request
and are never stored; an ended session or a failed CSRF check during an htmx request loads the
login page whole and comes back to the page; forms keep what was typed on a 409/422 and say who
decided and when."""

from __future__ import annotations

import html as html_lib
import re
from urllib.parse import parse_qs, urlsplit

from freezegun import freeze_time

from tests.conftest import PASSWORD, csrf_token

HX = {"HX-Request": "true"}


def test_every_answer_varies_on_hx_request_and_console_answers_are_not_stored(login, client, make):
    exc_id = make()
    login("rita")
    answers = {
        "page": client.get("/queues/all"),
        "fragment": client.get("/queues/all", headers=HX),
        "detail": client.get(f"/exceptions/{exc_id}"),
        "redirect": client.get("/"),
        "not found": client.get("/no-such-page"),
        "api": client.get("/api/v1/openapi.json"),
        "static": client.get("/static/console.css"),
    }
    for name, response in answers.items():
        assert "HX-Request" in response.headers.get("Vary", ""), name
        if name != "static":
            assert response.headers["Cache-Control"] == "no-store", name
        response.close()


def _next_of(location: str) -> str:
    parts = urlsplit(location)
    assert parts.path == "/login", location
    return parse_qs(parts.query)["next"][0]


def test_an_htmx_request_on_an_ended_session_goes_to_login_and_back_to_the_page(client, auth, users):
    with freeze_time("2026-03-01 09:00:00") as clock:
        assert auth.login("lena").status_code == 302
        clock.tick(16 * 60)  # past the idle timeout
        response = client.get(
            "/approvals/7",  # the review panel of the approvals page the user is on
            headers={**HX, "HX-Current-URL": "http://localhost/approvals?sort=age"},
        )
        assert response.status_code == 200 and response.get_data(as_text=True) == ""
        back_to = _next_of(response.headers["HX-Redirect"])
        assert back_to == "/approvals?sort=age"  # the page, not the fragment
        login_page = client.get(response.headers["HX-Redirect"]).get_data(as_text=True)
        assert "session timed out" in login_page
        token = csrf_token(client, response.headers["HX-Redirect"])
        again = client.post(
            response.headers["HX-Redirect"],
            data={"username": "lena", "password": PASSWORD, "csrf_token": token},
        )
        assert again.status_code == 302 and again.headers["Location"] == "/approvals?sort=age"


def test_a_csrf_failure_of_an_htmx_post_after_the_session_ended_goes_to_login(login, post, client, make):
    exc_id = make()
    login("rita")
    token = csrf_token(client, f"/exceptions/{exc_id}")
    client.delete_cookie("session")  # the session ended (logged out elsewhere, cookie gone)
    response = client.post(
        f"/exceptions/{exc_id}/decide",
        data={"action": "comment", "reason": "x", "csrf_token": token},
        headers={**HX, "HX-Current-URL": f"http://localhost/exceptions/{exc_id}"},
    )
    assert response.status_code == 200 and response.get_data(as_text=True) == ""
    assert _next_of(response.headers["HX-Redirect"]) == f"/exceptions/{exc_id}"


def test_a_csrf_failure_of_an_htmx_post_on_a_live_session_reloads_the_page(login, client, make):
    exc_id = make()
    login("rita")
    response = client.post(
        f"/exceptions/{exc_id}/decide",
        data={"action": "comment", "reason": "x", "csrf_token": "stale"},
        headers={**HX, "HX-Current-URL": f"http://localhost/exceptions/{exc_id}?tab=audit"},
    )
    assert response.headers["HX-Redirect"] == f"/exceptions/{exc_id}?tab=audit"
    assert "was not saved" in client.get(f"/exceptions/{exc_id}").get_data(as_text=True)


def test_a_409_on_the_detail_page_keeps_the_typed_text_and_names_who_decided(login, post, make):
    exc_id = make()
    login("leo")
    assert (
        post(
            f"/exceptions/{exc_id}/decide", {"action": "comment", "reason": "called the EHR team"}
        ).status_code
        == 303
    )
    login("rita")
    response = post(
        f"/exceptions/{exc_id}/decide",
        {"action": "escalate", "reason": "order looks unsafe", "expected_version": "1"},
        headers=HX,
    )
    html = html_lib.unescape(response.get_data(as_text=True))
    assert response.status_code == 409
    alert = re.search(r'<p class="form-error" role="alert">(.*?)</p>', html, re.S).group(1)
    assert "changed since you loaded it" in alert
    assert re.search(r"\(commented on by leo at \d\d:\d\d UTC\)$", alert)
    form = re.search(r'<form class="action action-escalate".*?</form>', html, re.S).group(0)
    assert '<textarea name="reason" rows="2" required>order looks unsafe</textarea>' in form
    other = re.search(r'<form class="action action-comment".*?</form>', html, re.S).group(0)
    assert "order looks unsafe" not in other  # only the form that was sent keeps it


def test_a_422_on_the_detail_page_keeps_the_typed_text(login, post, make):
    exc_id = make()
    login("rita")
    response = post(f"/exceptions/{exc_id}/decide", {"action": "discard", "reason": "sent twice"})
    html = response.get_data(as_text=True)
    assert response.status_code == 422 and "discard needs a reason code" in html
    form = re.search(r'<form class="action action-discard".*?</form>', html, re.S).group(0)
    assert '<textarea name="reason" rows="2">sent twice</textarea>' in form
