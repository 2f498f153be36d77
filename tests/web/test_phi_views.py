"""PHI views (issue 7): every response that carries full payload content writes one `phi.view`
for that user before it is sent, de-duplicated on the server per (user, exception, payload
version) within the window (RECON_PHI_VIEW_WINDOW_MINUTES, 15) — never through the session."""

from __future__ import annotations

from datetime import timedelta

from freezegun import freeze_time

from app.db.models import ExceptionItem, User
from app.db.session import transaction
from app.services.phi import record_phi_view


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
