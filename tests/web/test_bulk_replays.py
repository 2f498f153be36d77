"""Bulk replay in the console and the API (issue 6): request from a queue selection, one approval
by another clinical lead (password re-entered), live progress polled by htmx every 2 s, pause,
resume, cancel; the API answers the same way."""

from __future__ import annotations

import re

import pytest

from app.db.bulk_replay_models import BulkReplay
from app.db.models import ExceptionItem
from app.db.session import transaction
from app.services import bulk_replay
from tests.conftest import PASSWORD

HX = {"HX-Request": "true"}


@pytest.fixture
def three(make):
    return [make() for _ in range(3)]


def batch_state(sessions, batch_id):
    with transaction(sessions, read_only=True) as s:
        return s.get(BulkReplay, batch_id).state


def request_in_console(login, post, ids) -> int:
    login("rita")
    confirm = post("/bulk-replays/new", {"ids": [f"{i}" for i in ids], "reason": "EHR fixed the table"})
    assert confirm.status_code == 200
    html = confirm.get_data(as_text=True)
    assert f"data-bulk-total>{len(ids)}<" in html
    created = post(
        "/bulk-replays", {"ids": [str(i) for i in ids], "reason": "EHR fixed the table", "pace_count": "5"}
    )
    assert created.status_code == 303, created.get_data(as_text=True)
    return int(re.search(r"/bulk-replays/(\d+)$", created.headers["Location"]).group(1))


def test_the_queue_offers_request_replay_of_selected(login, post, three, client):
    login("rita")
    queue = client.get("/queues").get_data(as_text=True)
    assert 'formaction="/bulk-replays/new"' in queue and "Request replay of selected" in queue
    assert 'href="/bulk-replays"' in queue  # the header's Bulk replays link
    page = post("/queues/bulk", {"ids": [str(i) for i in three], "action": "resubmit", "reason": "fixed"})
    html = page.get_data(as_text=True)
    assert 'formaction="/bulk-replays/new"' in html and "Request replay of selected" in html


def test_request_marks_what_cannot_be_replayed_and_refuses_it_all_or_nothing(login, post, three, sessions):
    with transaction(sessions) as s:
        s.get(ExceptionItem, three[1]).state = "resolved"
    login("rita")
    html = post("/bulk-replays/new", {"ids": [str(i) for i in three], "reason": "r"}).get_data(as_text=True)
    assert f'data-ineligible="{three[1]}"' in html and "data-bulk-ineligible>1<" in html
    refused = post("/bulk-replays", {"ids": [str(i) for i in three], "reason": "r"})
    assert refused.status_code == 409 and f"#{three[1]}" in refused.get_data(as_text=True)
    with transaction(sessions, read_only=True) as s:
        assert s.get(ExceptionItem, three[0]).state == "open"


def test_console_request_approve_progress_pause_cancel(client, login, post, three, sessions, audit_events):
    batch_id = request_in_console(login, post, three)
    held_page = client.get(f"/exceptions/{three[0]}")  # a held exception's own page still works
    assert held_page.status_code == 200
    detail = client.get(f"/bulk-replays/{batch_id}").get_data(as_text=True)
    for exc_id in three:
        assert f'data-item="{exc_id}:held"' in detail  # the fixed list, each held
    # live progress: an htmx fragment that polls itself every 2 s
    fragment = client.get(f"/bulk-replays/{batch_id}/progress", headers=HX)
    assert fragment.status_code == 200
    body = fragment.get_data(as_text=True)
    assert 'hx-trigger="every 2s"' in body and 'data-count="held">3<' in body
    assert "<html" not in body
    # the requester cannot approve; a reviewer cannot either
    assert "another clinical lead must approve" not in detail  # rita is not a lead: no approve form
    login("lena")
    wrong = post(f"/bulk-replays/{batch_id}/approve", {"password": "nope"})
    assert wrong.status_code == 403
    assert audit_events(action="approval.password_failed", subject_type="bulk_replay")
    approved = post(f"/bulk-replays/{batch_id}/approve", {"password": PASSWORD})
    assert approved.status_code == 303
    assert batch_state(sessions, batch_id) == "approved"
    login("rita")
    assert post(f"/bulk-replays/{batch_id}/pause", {"reason": "EHR maintenance"}).status_code == 303
    assert batch_state(sessions, batch_id) == "paused"
    missing_reason = post(f"/bulk-replays/{batch_id}/cancel", {})
    assert missing_reason.status_code == 422
    assert post(f"/bulk-replays/{batch_id}/cancel", {"reason": "not needed"}).status_code == 303
    assert batch_state(sessions, batch_id) == "cancelled"
    # settled and final: the fragment tells htmx to stop polling
    done = client.get(f"/bulk-replays/{batch_id}/progress", headers=HX)
    assert done.status_code == 286
    assert 'hx-trigger="every 2s"' not in done.get_data(as_text=True)
    assert 'data-count="cancelled">3<' in done.get_data(as_text=True)
    listing = client.get("/bulk-replays").get_data(as_text=True)
    assert f'data-batch="{batch_id}"' in listing
    actions = [e.action for e in audit_events(subject_type="bulk_replay", subject_id=str(batch_id))]
    assert actions[:1] == ["bulk_replay.request"] and "bulk_replay.cancel" in actions


def test_approver_cannot_approve_own_bulk_request_in_the_console(login, post, make, sessions):
    ids = [make(), make()]
    login("lena")
    created = post("/bulk-replays", {"ids": [str(i) for i in ids], "reason": "r"})
    batch_id = int(created.headers["Location"].rsplit("/", 1)[1])
    page = post(f"/bulk-replays/{batch_id}/approve", {"password": PASSWORD})
    assert page.status_code == 403 and "four-eyes" in page.get_data(as_text=True)
    assert batch_state(sessions, batch_id) == "requested"


def test_auditors_watch_but_do_not_decide(login, post, three, client):
    batch_id = request_in_console(login, post, three)
    login("audrey")
    assert client.get(f"/bulk-replays/{batch_id}").status_code == 200
    assert post(f"/bulk-replays/{batch_id}/pause", {}).status_code == 403


# --- the API ---------------------------------------------------------------------------------------


def test_api_request_read_approve_pause_resume_cancel(client, make_tokens, three, sessions):
    tokens = make_tokens("rita", "lena", "audrey")

    def call(who, method, url, json=None):
        return client.open(url, method=method, json=json, headers={"Authorization": f"Bearer {tokens[who]}"})

    created = call(
        "rita",
        "POST",
        "/api/v1/bulk-replays",
        {"exception_ids": three, "reason": "EHR fixed", "pace": {"count": 2, "per_seconds": 1}},
    )
    assert created.status_code == 201, created.json
    batch = created.json
    assert (batch["state"], batch["total"], batch["pace"]) == (
        "requested",
        3,
        {"count": 2, "per_seconds": 1.0},
    )
    assert batch["progress"] == {
        "total": 3,
        "held": 3,
        "released": 0,
        "delivered": 0,
        "failed": 0,
        "cancelled": 0,
    }
    one = call("audrey", "GET", f"/api/v1/bulk-replays/{batch['id']}")
    assert [i["exception_id"] for i in one.json["items"]] == three
    assert (
        call(
            "rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/approve", {"password": PASSWORD}
        ).status_code
        == 403
    )
    wrong = call("lena", "POST", f"/api/v1/bulk-replays/{batch['id']}/approve", {"password": "nope"})
    assert (wrong.status_code, wrong.json["error"]["code"]) == (403, "password_required")
    ok = call("lena", "POST", f"/api/v1/bulk-replays/{batch['id']}/approve", {"password": PASSWORD})
    assert (ok.status_code, ok.json["state"], ok.json["approved_by"]) == (200, "approved", "lena")
    bulk_replay.release_due(sessions)  # the worker's pacing step: 2 per second
    paused = call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/pause", {})
    assert paused.json["state"] == "paused" and paused.json["progress"]["released"] >= 1
    assert call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/pause", {}).status_code == 409
    assert call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/resume", {}).json["state"] == "running"
    assert call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/cancel", {}).status_code == 422
    cancelled = call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/cancel", {"reason": "enough"})
    progress = cancelled.json["progress"]
    assert cancelled.json["state"] == "cancelled"
    assert progress["held"] == 0 and progress["released"] + progress["cancelled"] == 3
    assert (
        call("audrey", "POST", "/api/v1/bulk-replays", {"exception_ids": three, "reason": "x"}).status_code
        == 403
    )
    assert call("rita", "POST", f"/api/v1/bulk-replays/{batch['id']}/explode", {}).status_code == 404
    assert call("rita", "GET", "/api/v1/bulk-replays/999999").status_code == 404
    listing = call("audrey", "GET", "/api/v1/bulk-replays")
    assert [b["id"] for b in listing.json["items"]] == [batch["id"]]


def exercise_bulk_replays(call) -> None:
    """For tests/web/test_openapi.py: every documented bulk replay answer, seen for real (two
    exceptions reported through the API on its world's connection)."""
    payload = '{"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/1"}}'
    report = {
        "connection": "mercy-epic",
        "message_type": "MedicationRequest",
        "content_type": "application/fhir+json",
        "payload": payload,
        "error": "HTTP 422 Unprocessable",
    }
    ids = [
        call("svc", "POST", "/exceptions", report, headers={"Idempotency-Key": f"bulk-{n}"}).json[
            "exception_id"
        ]
        for n in range(2)
    ]
    call("rita", "POST", "/bulk-replays", {"exception_ids": ids})  # 422: a reason is required
    created = call("rita", "POST", "/bulk-replays", {"exception_ids": ids, "reason": "EHR fixed"})
    call("rita", "POST", "/bulk-replays", {"exception_ids": ids, "reason": "again"})  # 409: already held
    batch = created.json["id"]
    call("lena", "GET", "/bulk-replays")
    call("lena", "GET", f"/bulk-replays/{batch}")
    call("lena", "POST", f"/bulk-replays/{batch}/pause", {})  # 409: not approved yet
    call("lena", "POST", f"/bulk-replays/{batch}/cancel", {})  # 422: a reason is required
    call("lena", "POST", "/bulk-replays/999999/pause", {})  # 404
    call("lena", "POST", f"/bulk-replays/{batch}/reject", {"reason": "wait for the fix"})
