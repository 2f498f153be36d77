"""PHI views (issue 7): every response that carries full payload content writes one `phi.view`
for that user before it is sent, de-duplicated on the server per (user, exception, payload
version) within the window (RECON_PHI_VIEW_WINDOW_MINUTES, 15) — never through the session."""

from __future__ import annotations

from datetime import timedelta

import pytest
from freezegun import freeze_time

from app.db.models import ExceptionItem, User
from app.db.session import transaction
from app.domain.payloads import FHIR_JSON, HL7_ER7
from app.services.phi import record_phi_view
from app.services.users import create_token


def _record(sessions, user_id: int, exception_id: int, version: int) -> bool:
    with transaction(sessions) as s:
        return record_phi_view(s, s.get(User, user_id), s.get(ExceptionItem, exception_id), version)


def test_record_phi_view_writes_once_per_user_exception_and_version_within_the_window(
    sessions, users, make, audit_events
):
    exc_id = make()
    rita, lena = users["rita"].id, users["lena"].id
    with freeze_time("2026-03-01 10:00:00") as clock:
        assert _record(sessions, rita, exc_id, 1) is True
        assert _record(sessions, rita, exc_id, 1) is False  # same user, same version: covered
        assert _record(sessions, lena, exc_id, 1) is True  # another user: their own event
        assert _record(sessions, rita, exc_id, 2) is True  # another version: its own event
        clock.tick(timedelta(minutes=14, seconds=59))
        assert _record(sessions, rita, exc_id, 1) is False
        clock.tick(timedelta(seconds=2))  # the window (15 min) since the last event has passed
        assert _record(sessions, rita, exc_id, 1) is True
    views = audit_events(action="phi.view")
    assert [(e.actor, e.details["payload_version"]) for e in views] == [
        ("rita", 1),
        ("lena", 1),
        ("rita", 2),
        ("rita", 1),
    ]


# --- every response that carries full payload content -------------------------------------------


@pytest.fixture
def tokens(sessions, users):
    with transaction(sessions) as s:
        return {name: create_token(s, s.get(User, users[name].id)) for name in ("rita", "ravi")}


def _fetch(client, post, path: str, tokens: dict, user: str):
    """One request of `path` as `user` (already logged in for console paths)."""
    if path.startswith("api:"):
        return client.get(path[4:], headers={"Authorization": f"Bearer {tokens[user]}"})
    if path.startswith("post:"):
        url, _, field = path[5:].partition("#")
        data = {"payload": "{}", "expected_version": "1", **({field: "1"} if field else {})}
        return post(url, data, headers={"HX-Request": "true"} if url.endswith("/diff") else {})
    if path.startswith("htmx:"):
        return client.get(path[5:], headers={"HX-Request": "true"})
    return client.get(path)


FULL_PAYLOAD_PATHS = {
    "detail, full view": "/exceptions/{id}?payload=1",
    "payload fragment": "htmx:/exceptions/{id}/payload",
    "correction editor": "/exceptions/{id}/correct",
    "correction preview, no editor first": "post:/exceptions/{id}/correct#preview",
    "live diff": "post:/exceptions/{id}/diff",
    "API exception": "api:/api/v1/exceptions/{id}",
}


@pytest.mark.parametrize("content_type", [FHIR_JSON, HL7_ER7])
@pytest.mark.parametrize("name", list(FULL_PAYLOAD_PATHS))
def test_every_full_payload_path_writes_one_phi_view_per_user_within_the_window(
    name, content_type, client, auth, post, make, tokens, audit_events
):
    exc_id = make(
        content_type=content_type, message_type="ORU^R01" if content_type == HL7_ER7 else "MedicationRequest"
    )
    path = FULL_PAYLOAD_PATHS[name].format(id=exc_id)

    def views() -> list[tuple[str, str]]:
        return [(e.actor, e.subject_id) for e in audit_events(action="phi.view")]

    auth.login("rita")
    response = _fetch(client, post, path, tokens, "rita")
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert views() == [("rita", str(exc_id))]
    assert _fetch(client, post, path, tokens, "rita").status_code == 200
    assert views() == [("rita", str(exc_id))]  # the same user again within the window: none
    # Logging out and in again (a new session cookie) changes nothing: de-duplicated on the server.
    auth.logout()
    auth.login("rita")
    _fetch(client, post, path, tokens, "rita")
    assert views() == [("rita", str(exc_id))]
    # Another user in the same browser writes their own.
    auth.logout()
    auth.login("ravi")
    assert _fetch(client, post, path, tokens, "ravi").status_code == 200
    assert views() == [("rita", str(exc_id)), ("ravi", str(exc_id))]


def test_the_view_is_recorded_before_the_content_is_sent(client, auth, make, sessions, monkeypatch):
    """If the phi.view cannot be written, the payload is not sent."""
    from app.services import phi

    exc_id = make()
    auth.login("rita")

    def broken(*args, **kwargs):
        raise RuntimeError("audit unavailable")

    monkeypatch.setattr(phi.audit, "record", broken)
    response = client.get(f"/exceptions/{exc_id}?payload=1")
    assert response.status_code == 500 and "rxnorm" not in response.get_data(as_text=True)


def test_the_approval_review_panel_records_the_approvers_view_once(login, post, make, audit_events):
    from tests.web.test_review_changes import request_corrected_replay

    exc_id = request_corrected_replay(login, post, make)
    before = len(audit_events(action="phi.view"))
    client = login("lena")
    for _ in range(2):
        assert client.get(f"/approvals/{exc_id}").status_code == 200
    views = [(e.actor, e.subject_id) for e in audit_events(action="phi.view")[before:]]
    assert views == [("lena", str(exc_id))]
