"""Reconciliation Console: the Flask application factory."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from werkzeug.routing import IntegerConverter

from .config import Settings
from .web.input_guard import MAX_ROW_ID

ROOT = Path(__file__).resolve().parent.parent


class BoundedInt(IntegerConverter):
    """`<int:...>` route parts that fit the id columns: past their range is a 404, not a
    database overflow error. The pattern itself stops at 2^31 - 1: a value refused only later
    (by `max`) made Werkzeug answer 405 when another rule shares the path with another method."""

    regex = (
        r"(?:\d{1,9}|1\d{9}|20\d{8}|21[0-3]\d{7}|214[0-6]\d{6}|2147[0-3]\d{5}|21474[0-7]\d{4}"
        r"|214748[0-2]\d{3}|2147483[0-5]\d{2}|21474836[0-3]\d|214748364[0-7])"
    )

    def __init__(self, map, *args, **kwargs):
        kwargs.setdefault("max", MAX_ROW_ID)
        super().__init__(map, *args, **kwargs)


def create_app(config: dict | None = None) -> Flask:
    """Build the web application. `config` overrides settings (tests pass DATABASE_URL etc.)."""
    settings = Settings.from_env()
    config = dict(config or {})
    if "DATABASE_URL" in config:
        settings.database_url = config["DATABASE_URL"]
    if "REDIS_URL" in config:
        settings.redis_url = config["REDIS_URL"]
    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(Path(__file__).parent / "static"),
        instance_path=str(settings.instance_path),
    )
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_HEADERS=["X-CSRFToken", "X-CSRF-Token"],
        MAX_CONTENT_LENGTH=10 * 1024 * 1024,
        RECON_SETTINGS=settings,
        RECON_SEAL_MODE=settings.seal_mode,
        RECON_TOKEN_CACHE_SECONDS=settings.token_cache_seconds,
    )
    app.config.update(config)
    app.url_map.converters["int"] = BoundedInt
    register_extensions(app, settings)
    register_blueprints(app)
    from .web import security

    security.init_app(app, settings)  # after the blueprints: it throttles the login view
    from .web.errors import register_error_handlers

    register_error_handlers(app)
    from .logs import configure_logging
    from .web import input_guard, request_log

    configure_logging(app)
    request_log.init_app(app)
    input_guard.init_app(app)
    from .web import phi

    phi.init_app(app)  # the PHI rule on every response (docs/SECURITY.md "PHI")
    return app


def register_extensions(app: Flask, settings: Settings) -> None:
    from .web import extensions

    extensions.init_app(app, settings)


def register_blueprints(app: Flask) -> None:
    from .web.account import bp as account_bp
    from .web.admin import bp as admin_bp
    from .web.api import bp as api_bp
    from .web.approvals import bp as approvals_bp
    from .web.audit import bp as audit_bp
    from .web.auth import bp as auth_bp
    from .web.bulk_replays import bp as bulk_replays_bp
    from .web.dashboard import bp as dashboard_bp
    from .web.exceptions import bp as exceptions_bp
    from .web.ops import bp as ops_bp
    from .web.queues import bp as queues_bp

    for bp in (
        auth_bp,
        dashboard_bp,
        queues_bp,
        exceptions_bp,
        approvals_bp,
        bulk_replays_bp,
        audit_bp,
        admin_bp,
        account_bp,
        api_bp,
        ops_bp,
    ):
        app.register_blueprint(bp)
