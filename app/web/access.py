"""The one server-side access check every request passes through (SPEC 3.4).

Views declare what they need with @requires(Permission.X) or @public. A view
that declares nothing is refused: access is denied by default. API requests
authenticate with a bearer token; console requests with the login session.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, abort, g, jsonify, redirect, request, url_for
from flask_login import current_user

from app.domain.roles import Permission, has_permission

PUBLIC = "__public__"


def requires(*permissions: Permission) -> Callable:
    """Declare the permissions a view needs (all of them)."""

    def decorate(view):
        view.required_permissions = tuple(permissions)
        return view

    return decorate


def public(view):
    view.required_permissions = (PUBLIC,)
    return view


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


def _check_access():
    g.actor = None
    view = app_view()
    if request.endpoint == "static":
        return None
    if view is None:
        return None  # 404/405 handled by Flask
    needed = getattr(view, "required_permissions", None)
    is_api = request.blueprint == "api"
    if is_api:
        from app.services.users import user_for_token

        from .extensions import unit_of_work

        header = request.headers.get("Authorization", "")
        if needed == (PUBLIC,):
            return None
        if not header.startswith("Bearer "):
            return _api_error(401, "unauthorized", "send Authorization: Bearer <token>")
        with unit_of_work(read_only=True) as s:
            user = user_for_token(s, header[len("Bearer ") :].strip())
        if user is None:
            return _api_error(401, "unauthorized", "invalid or revoked token")
        g.actor = user
    else:
        if current_user.is_authenticated:
            if not has_permission(current_user.role, Permission.CONSOLE_LOGIN):
                from flask_login import logout_user

                logout_user()
                abort(403)
            g.actor = current_user._get_current_object()
        if needed == (PUBLIC,):
            return None
        if g.actor is None:
            return redirect(url_for("auth.login", next=request.full_path))
    if not needed:
        return _api_error(403, "forbidden", "endpoint has no access rule") if is_api else abort(403)
    if not all(has_permission(g.actor.role, p) for p in needed):
        if is_api:
            return _api_error(403, "forbidden", f"role {g.actor.role} may not do this")
        abort(403)
    return None


def app_view():
    from flask import current_app

    return current_app.view_functions.get(request.endpoint) if request.endpoint else None
