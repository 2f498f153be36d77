"""PHI views and PHI retention (issue 7; docs/SECURITY.md "PHI").

`record_phi_view` is the one way a full payload is shown: it writes a `phi.view` audit event for
that user, in the caller's transaction (so before the response is sent), de-duplicated on the
server per (user, exception, payload version) within a window — never through the session cookie,
so logging out and in again, or a second user in the same browser, changes nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import ExceptionItem, PayloadVersion, PhiViewMark, User

from . import audit
from .clock import utcnow

DEFAULT_VIEW_WINDOW_MINUTES = 15.0


def view_window() -> timedelta:
    """RECON_PHI_VIEW_WINDOW_MINUTES (default 15): one `phi.view` per (user, exception, payload
    version) within this window."""
    return timedelta(
        minutes=float(os.environ.get("RECON_PHI_VIEW_WINDOW_MINUTES", DEFAULT_VIEW_WINDOW_MINUTES))
    )


def record_phi_view(
    session: so.Session,
    user: User,
    exception: ExceptionItem,
    payload_version: PayloadVersion | int | None,
    *,
    channel: str = "console",
    window: timedelta | None = None,
) -> bool:
    """Audit that `user` is shown the full content of `payload_version` (a PayloadVersion or its
    version number; None: the message's current version) of `exception`. Call before the content
    is sent, in the transaction that loads it. Returns True when an event was written, False when
    the same user's view of the same version was audited within the window."""
    if isinstance(payload_version, PayloadVersion):
        version = payload_version.version
    elif payload_version is None:
        current = exception.message.current_payload
        version = current.version if current is not None else 0
    else:
        version = int(payload_version)
    now = utcnow()
    window = view_window() if window is None else window
    key = {"user_id": user.id, "exception_id": exception.id, "payload_version": version}
    mark = _locked_mark(session, key)
    if mark is None:
        try:
            with session.begin_nested():
                mark = PhiViewMark(**key, recorded_at=now)
                session.add(mark)
        except sa.exc.IntegrityError:
            # Another request of this user inserted it first; its event counts for this one too
            # unless the window had passed (it cannot have: it was just written).
            mark = _locked_mark(session, key)
            if mark is None or mark.recorded_at > now - window:
                return False
            mark.recorded_at = now
    elif mark.recorded_at > now - window:
        return False
    else:
        mark.recorded_at = now
    audit.record(
        session,
        actor=user.username,
        action="phi.view",
        subject_type="exception",
        subject_id=exception.id,
        details={"message_id": exception.message_id, "payload_version": version, "channel": channel},
    )
    return True


def _locked_mark(session: so.Session, key: dict) -> PhiViewMark | None:
    # FOR UPDATE on PostgreSQL: two requests of one user serialise on the mark, so one writes.
    return session.scalars(
        sa.select(PhiViewMark).filter_by(**key).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
