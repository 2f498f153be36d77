"""Flask extensions and per-app services (sessions, Redis, queue)."""

from __future__ import annotations

from contextlib import contextmanager

from flask import Flask, current_app
from flask_htmx import HTMX
from flask_login import LoginManager
from flask_wtf import CSRFProtect

from app.config import Settings
from app.db.session import session_factory, transaction

login_manager = LoginManager()
csrf = CSRFProtect()
htmx = HTMX()


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["recon_sessions"] = session_factory(settings.database_url)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in to continue."
    csrf.init_app(app)
    htmx.init_app(app)
    from . import access

    access.init_app(app)

    @app.teardown_request
    def _seal_backstop(_exc):
        # Events are sealed right after each commit; this catches what a killed process or a
        # timed-out wait left behind, at most once per process every BACKSTOP_SECONDS.
        from app.services.audit import seal_if_due

        try:
            seal_if_due(app.extensions["recon_sessions"])
        except Exception:
            app.logger.exception("audit seal backstop failed")


def sessions():
    return current_app.extensions["recon_sessions"]


@contextmanager
def unit_of_work(*, read_only: bool = False, defer_seal: bool = False):
    """One transaction for one request's work: the only way routes touch the database.
    read_only=True for pure reads (no audit event): on SQLite they then do not queue behind writers.
    defer_seal=True (the intake API): its audit events are sealed by the background sealer when
    the app's RECON_SEAL_MODE is "background" (the default; see app/services/sealer.py)."""
    from app.services.exceptions import ApprovalPasswordFailed

    try:
        defer = defer_seal and seals_in_background()
        with transaction(sessions(), read_only=read_only, defer_seal=defer) as s:
            yield s
    except ApprovalPasswordFailed as exc:
        # The refused decision rolled back; the failure is recorded (audited, counted towards the
        # approval lock) in a transaction of its own, after that one ended (SQLite: one writer).
        from app.services.users import record_approval_password_failure

        with transaction(sessions()) as s:
            record_approval_password_failure(s, exc.user_id, exception_id=exc.exception_id)
        raise


def seals_in_background() -> bool:
    """Whether this app's deferring units of work hand their audit events to the background
    sealer (RECON_SEAL_MODE, see app/services/sealer.py)."""
    return current_app.config.get("RECON_SEAL_MODE", "background") == "background"


def redis_client():
    """The app's Redis client (configured URL or the embedded server), created on first use."""
    client = current_app.extensions.get("recon_redis")
    if client is None:
        from app.adapters.redis_conn import connect, redis_url

        client = current_app.extensions["recon_redis"] = connect(
            redis_url(current_app.config["RECON_SETTINGS"])
        )
    return client


@login_manager.user_loader
def _load_user(user_id: str):
    from app.services.users import active_user

    with unit_of_work(read_only=True) as s:
        return active_user(s, int(user_id))
