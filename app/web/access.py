"""The one server-side access check every request passes through (SPEC 3.4).

Views declare what they need with @requires(Permission.X), @public or @scrape. A
view that declares nothing is refused: access is denied by default. API requests
authenticate with a bearer token; console requests with the login session, which
must still be current: opened under the user's present session epoch (logout,
password change and deactivation end every session), used within the idle
timeout and younger than the absolute lifetime.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Callable

from flask import Flask, abort, current_app, flash, g, jsonify, request, session
from flask_login import current_user, logout_user

from app.domain.roles import Permission, Role, has_permission

PUBLIC = "__public__"
SCRAPE = "__scrape__"
# How stale the session's last-seen time may get before it is written again: the cookie is not
# re-sent on every request, at the cost of this much slack in the idle timeout.
SEEN_RESOLUTION_SECONDS = 10


def requires(*permissions: Permission) -> Callable:
    """Declare the permissions a view needs (all of them)."""

    def decorate(view):
        view.required_permissions = tuple(permissions)
        return view

    return decorate


def public(view):
    view.required_permissions = (PUBLIC,)
    return view


def scrape(view):
    """For /metrics: a scraper with RECON_METRICS_TOKEN as its bearer token, or, when no token is
    configured, a client on this host (loopback) — never the open network."""
    view.required_permissions = (SCRAPE,)
    return view


def begin_session(user) -> None:
    """Stamp a fresh login session with the user's session epoch and its start time."""
    now = time.time()
    session["epoch"] = user.session_epoch or 0
    session["auth_at"] = now
    session["seen_at"] = now


def _session_end_reason(user) -> str | None:
    """Why this console session may no longer be used, or None (and it counts as activity)."""
    settings = current_app.config["RECON_SETTINGS"]
    now = time.time()
    auth_at, seen_at = session.get("auth_at"), session.get("seen_at")
    if session.get("epoch") != (user.session_epoch or 0):
        return "Your session was ended. Please log in again."
    if not isinstance(auth_at, int | float) or not isinstance(seen_at, int | float):
        return "Please log in again."
    if now - auth_at > settings.session_lifetime_hours * 3600:
        return "Your session reached its maximum length. Please log in again."
    if now - seen_at > settings.session_idle_minutes * 60:
        return "Your session timed out after inactivity. Please log in again."
    if now - seen_at > SEEN_RESOLUTION_SECONDS:
        session["seen_at"] = now
    return None


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235)."""
    return _bearer_token(request.headers)


def _bearer_token(headers) -> str | None:
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if not token or scheme.lower() != "bearer":
        return None
    return token


def _may_scrape() -> bool:
    expected = current_app.config["RECON_SETTINGS"].metrics_token
    if expected:
        sent = bearer_token() or ""
        return hmac.compare_digest(sent.encode(), expected.encode())
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def current_actor():
    """The authenticated user for this request (console session or API token), or None."""
    return getattr(g, "actor", None)


def can(permission: Permission) -> bool:
    actor = current_actor()
    return actor is not None and has_permission(actor.role, permission)


def init_app(app: Flask) -> None:
    app.before_request(_check_access)
    app.context_processor(lambda: {"can": can, "Permission": Permission, "actor": current_actor()})


def _api_error(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="recon"'
    return response


# Service accounts' tokens, checked: token hash -> (checked at, users.token_generation() then,
# user, expires_at). A hit skips the database for RECON_TOKEN_CACHE_SECONDS (default 5); a
# revocation, deactivation or role change committed in this process drops the whole cache at
# once, one made in another process takes effect here within that many seconds. People's
# tokens (which can decide and approve) are checked against the database on every request.
_token_cache: dict[str, tuple[float, int, object, object]] = {}
_TOKEN_CACHE_MAX = 1000


def _checked_token(token: str, ttl: float | None = None):
    users, utcnow, unit_of_work = _token_functions()
    if ttl is None:
        ttl = current_app.config.get("RECON_TOKEN_CACHE_SECONDS", 0)
    key = users.token_hash(token)
    generation = users.token_generation()
    hit = _token_cache.get(key) if ttl > 0 else None
    if hit is not None and hit[1] == generation and time.monotonic() - hit[0] < ttl:
        expires_at = hit[3]
        if expires_at is not None and expires_at <= utcnow():
            return None, "expired", False
        return hit[2], "ok", False
    with unit_of_work(read_only=True) as s:
        user, status, stale, expires_at = users.token_check(s, token)
    if ttl > 0 and user is not None and user.role == Role.SERVICE.value:
        if len(_token_cache) >= _TOKEN_CACHE_MAX:
            _token_cache.clear()
        _token_cache[key] = (time.monotonic(), generation, user, expires_at)
    else:
        _token_cache.pop(key, None)
    return user, status, stale


_token_imports = None


def _token_functions():
    """(app.services.users, its utcnow, unit_of_work), imported on first use, not per request
    (this module is imported while the app, and those modules' own imports, are being set up)."""
    global _token_imports
    if _token_imports is None:
        from app.services import users
        from app.services.clock import utcnow

        from .extensions import unit_of_work

        _token_imports = (users, utcnow, unit_of_work)
    return _token_imports


def _check_access():
    # The request's context objects are looked up once here, not once per attribute (each
    # look-up through Flask's proxies is a context-variable read).
    ctx_g = g._get_current_object()
    req = request._get_current_object()
    ctx_g.actor = None
    endpoint = req.endpoint
    app = current_app._get_current_object()
    view = app.view_functions.get(endpoint) if endpoint else None
    if endpoint == "static":
        return None
    if view is None:
        return None  # 404/405 handled by Flask
    needed = getattr(view, "required_permissions", None)
    is_api = req.blueprint == "api"
    if needed == (SCRAPE,):
        return None if _may_scrape() else _api_error(401, "unauthorized", "metrics need the scrape token")
    if is_api:
        if needed == (PUBLIC,):
            return None
        token = _bearer_token(req.headers)
        if token is None:
            return _api_error(401, "unauthorized", "send Authorization: Bearer <token>")
        user, status, stale = _checked_token(token, app.config.get("RECON_TOKEN_CACHE_SECONDS", 0))
        if status == "expired":
            return _api_error(401, "token_expired", "this token has expired; create a new one on My tokens")
        if user is None:
            return _api_error(401, "unauthorized", "invalid or revoked token")
        if stale:
            users, _utcnow, unit_of_work = _token_functions()
            with unit_of_work() as s:
                users.touch_token(s, token)
        ctx_g.actor = user
    else:
        if current_user.is_authenticated:
            if not has_permission(current_user.role, Permission.CONSOLE_LOGIN):
                logout_user()
                abort(403)
            ended = _session_end_reason(current_user)
            if ended is not None:
                logout_user()
                session.clear()
                flash(ended)
                if needed == (PUBLIC,):
                    return None
                return _to_login()
            ctx_g.actor = current_user._get_current_object()
        if needed == (PUBLIC,):
            return None
        if ctx_g.actor is None:
            return _to_login()
    if not needed:
        return _api_error(403, "forbidden", "endpoint has no access rule") if is_api else abort(403)
    role = ctx_g.actor.role
    if not all(has_permission(role, p) for p in needed):
        if is_api:
            return _api_error(403, "forbidden", f"role {role} may not do this")
        abort(403)
    return None


def _to_login():
    """Send the browser to the login page and, after it, back to the page it was on. An htmx
    request is told to load it as a whole page (HX-Redirect) rather than swap the login form
    into a fragment's place (app/web/errors.py)."""
    from .errors import to_login

    return to_login()


def app_view():
    from flask import current_app

    return current_app.view_functions.get(request.endpoint) if request.endpoint else None
