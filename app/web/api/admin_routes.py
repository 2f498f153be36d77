"""API for administration (SPEC 3.4 admin; README: configuration through the API): customers,
connections, SLA policy, users and service tokens. Each change goes through the service the
console's admin pages use, so it is audited there and the separation-of-duties rules hold: an
admin mints tokens for service accounts only, and a person's account gets a one-time
enrollment link (to set their own password), never a password chosen by the admin."""

from __future__ import annotations

from flask import jsonify, request, url_for

from app.domain.roles import Permission
from app.services import api_views, users

from ..access import current_actor, requires
from ..extensions import sessions, unit_of_work
from . import bp
from .parsing import field, json_object, present

CONNECTION_FIELDS = {
    "name": str,
    "customer": str,
    "protocol": str,
    "endpoint": str,
    "environment": str,
    "vendor": str,
    "fhir_version": str,
    "conditional_create": bool,
    "identifier_search": bool,
    "diagnosis_code_system": str,
    "enabled_message_types": list,
    "sequence_sensitive": bool,
}
CONNECTION_REQUIRED = ("name", "customer", "protocol", "endpoint")
CONNECTION_CHANGES = {
    "enabled": bool,
    "sequence_sensitive": bool,
    "max_auto_retries": int,
    "retry_backoff_seconds": float,
    "circuit_failure_threshold": int,
    "circuit_cooldown_seconds": float,
}


def _typed(body: dict, spec: dict[str, type], required: tuple[str, ...] = ()) -> dict:
    """The fields of `spec` the body carries, each checked for its type."""
    return {
        name: field(body, name, kind, required=name in required)
        for name, kind in spec.items()
        if name in required or body.get(name) is not None
    }


def _reason() -> str | None:
    """The `reason` of an optional JSON body (or, for DELETE, of the query string)."""
    if not request.get_data():
        return request.args.get("reason")
    return field(json_object(), "reason", str)


def _created(payload: dict):
    response = jsonify(payload)
    response.status_code = 201
    return response


def _me() -> str:
    return current_actor().username


def _enrollment(secret: str) -> dict:
    return {
        "enrollment_url": url_for("account.enroll", secret=secret, _external=True),
        "enrollment_expires_in_hours": users.DEFAULT_ENROLLMENT_HOURS,
    }


# --- customers and connections --------------------------------------------------------------------


@bp.get("/customers")
@requires(Permission.ADMIN)
def list_customers():
    with unit_of_work(read_only=True) as s:
        return jsonify({"items": api_views.customer_list(s)})


@bp.post("/customers")
@requires(Permission.ADMIN)
def create_customer():
    name = field(json_object(), "name", str, required=True)
    with unit_of_work() as s:
        return _created(api_views.create_customer(s, _me(), name))


@bp.get("/connections")
@requires(Permission.ADMIN)
def list_connections():
    with unit_of_work(read_only=True) as s:
        return jsonify({"items": api_views.connection_list(s)})


@bp.post("/connections")
@requires(Permission.ADMIN)
def create_connection():
    """Register an EHR connection; its endpoint is validated for its protocol."""
    fields = _typed(json_object(), CONNECTION_FIELDS, CONNECTION_REQUIRED)
    with unit_of_work() as s:
        return _created(api_views.create_connection(s, _me(), fields))


# One rule per path with several methods, one view dispatching on the method: with a rule per
# method, an id past the column's range (the int converter refuses it) made Werkzeug answer 405
# naming the other rule's method instead of 404.


@bp.route("/connections/<int:connection_id>", methods=["GET", "PATCH"])
@requires(Permission.ADMIN)
def connection(connection_id: int):
    """GET one connection; PATCH it."""
    if request.method == "PATCH":
        return _update_connection(connection_id)
    with unit_of_work(read_only=True) as s:
        return jsonify(api_views.connection_view(s, connection_id))


def _update_connection(connection_id: int):
    """Enable/disable (disabling needs a reason; a disabled connection's new messages become
    `config` exceptions) and the retry and circuit-breaker policy; only the fields sent change."""
    body = json_object()
    changes = _typed(present(body, tuple(CONNECTION_CHANGES)), CONNECTION_CHANGES)
    reason = field(body, "reason", str)
    with unit_of_work() as s:
        return jsonify(api_views.update_connection(s, _me(), connection_id, changes, reason=reason))


@bp.post("/connections/<int:connection_id>/circuit/reset")
@requires(Permission.ADMIN)
def reset_circuit(connection_id: int):
    """Close the connection's circuit breaker (after the EHR team says it is back)."""
    with unit_of_work() as s:
        return jsonify(api_views.reset_circuit(s, _me(), connection_id))


@bp.post("/connections/<int:connection_id>/test")
@requires(Permission.ADMIN)
def test_connection(connection_id: int):
    """Probe the connection's own endpoint (nothing is delivered); the result is audited."""
    return jsonify(api_views.probe_connection(sessions(), _me(), connection_id))


# --- SLA policy -----------------------------------------------------------------------------------


@bp.get("/sla-rules")
@requires(Permission.ADMIN)
def list_sla_rules():
    with unit_of_work(read_only=True) as s:
        return jsonify({"items": api_views.sla_rule_list(s)})


@bp.post("/sla-rules")
@requires(Permission.ADMIN)
def create_sla_rule():
    """A rule (category × clinical risk × optional customer → minutes) for exceptions opened from
    now on."""
    body = json_object()
    minutes = field(body, "minutes", int, required=True)
    category, risk, customer = (field(body, n, str) for n in ("category", "risk", "customer"))
    with unit_of_work() as s:
        return _created(
            api_views.create_sla_rule(
                s, _me(), minutes=minutes, category=category, risk=risk, customer=customer
            )
        )


@bp.route("/sla-rules/<int:rule_id>", methods=["PATCH", "DELETE"])
@requires(Permission.ADMIN)
def sla_rule(rule_id: int):
    """PATCH a rule's minutes; DELETE it."""
    if request.method == "DELETE":
        return _delete_sla_rule(rule_id)
    minutes = field(json_object(), "minutes", int, required=True)
    with unit_of_work() as s:
        return jsonify(api_views.update_sla_rule(s, _me(), rule_id, minutes))


def _delete_sla_rule(rule_id: int):
    """Delete a rule; a reason is required (JSON body or ?reason=)."""
    reason = _reason()
    with unit_of_work() as s:
        api_views.delete_sla_rule(s, _me(), rule_id, reason)
    return "", 204


# --- users and service tokens ---------------------------------------------------------------------


@bp.get("/users")
@requires(Permission.ADMIN)
def list_users():
    with unit_of_work(read_only=True) as s:
        return jsonify({"items": api_views.user_list(s)})


@bp.post("/users")
@requires(Permission.ADMIN)
def create_user():
    """A person's account comes with a one-time enrollment link (shown once, expiring) to set
    their own password; a service account with none (give it a token)."""
    body = json_object()
    username = field(body, "username", str, required=True)
    role = field(body, "role", str, required=True)
    with unit_of_work() as s:
        new = api_views.create_user(s, current_actor().id, username, role)
    out = {"user": new.user}
    if new.enrollment_secret:
        out |= _enrollment(new.enrollment_secret)
    return _created(out)


@bp.route("/users/<int:user_id>", methods=["GET", "PATCH"])
@requires(Permission.ADMIN)
def user(user_id: int):
    """GET one user; PATCH them."""
    if request.method == "PATCH":
        return _update_user(user_id)
    with unit_of_work(read_only=True) as s:
        return jsonify(api_views.user_view(s, user_id))


def _update_user(user_id: int):
    """Change the role (a clinical-lead grant is audited and listed) and/or deactivate (with a
    reason; it ends every session and stops every token) or reactivate."""
    body = json_object()
    changes = _typed(present(body, ("role", "active")), {"role": str, "active": bool})
    reason = field(body, "reason", str)
    with unit_of_work() as s:
        return jsonify(api_views.update_user(s, current_actor().id, user_id, changes, reason=reason))


@bp.post("/users/<int:user_id>/reset")
@requires(Permission.ADMIN)
def reset_password(user_id: int):
    """The current password stops working, every session ends, and a new one-time link is
    returned for the user (never a password). Body {"reason"} (required)."""
    reason = _reason()
    with unit_of_work() as s:
        secret = api_views.reset_password(s, current_actor().id, user_id, reason)
        user = api_views.user_view(s, user_id)
    return jsonify({"user": user} | _enrollment(secret))


@bp.post("/users/<int:user_id>/approval-lock/clear")
@requires(Permission.ADMIN)
def clear_approval_lock(user_id: int):
    """Let an account approve again after 5 wrong approval passwords (another admin's job)."""
    with unit_of_work() as s:
        return jsonify(api_views.clear_approval_lock(s, current_actor().id, user_id))


@bp.get("/tokens")
@requires(Permission.ADMIN)
def list_tokens():
    """Every API token (prefix only: tokens are stored hashed)."""
    with unit_of_work(read_only=True) as s:
        return jsonify({"items": api_views.token_list(s)})


@bp.post("/tokens")
@requires(Permission.ADMIN)
def create_token():
    """A token for a service account, returned once. A person's account is refused (403
    token_for_person): people create their own tokens on My tokens."""
    body = json_object()
    username = field(body, "user", str, required=True)
    days = field(body, "days", int, default=users.DEFAULT_TOKEN_DAYS)
    with unit_of_work() as s:
        return _created(api_views.create_service_token(s, current_actor().id, username, days))


@bp.post("/tokens/<int:token_id>/revoke")
@requires(Permission.ADMIN)
def revoke_token(token_id: int):
    """Revoke a token; requests with it fail from now on. Body {"reason"} (required)."""
    reason = _reason()
    with unit_of_work() as s:
        return jsonify(api_views.revoke_token(s, _me(), token_id, reason))
