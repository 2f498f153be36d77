"""HTTP API v1 (SPEC 9.3): bearer tokens, JSON in and out, JSON errors."""

from __future__ import annotations

import logging
from datetime import datetime

from flask import Response, g, jsonify, request, stream_with_context
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.domain.errors import Conflict, Invalid
from app.domain.idempotency import request_fingerprint, valid_key
from app.domain.roles import Permission
from app.domain.timeparse import parse_utc
from app.services import api_views, audit, audit_export, drift, queries
from app.services.audit_export import event_json
from app.services.clock import utcnow
from app.services.exceptions import DecisionInput
from app.services.intake import (
    find_existing,
    replay_response,
    submit_message,
    submit_message_in_one_statement,
)
from app.services.intake import report_exception as report_failed_message

from ..access import current_actor, public, requires
from ..errors import error_response
from ..extensions import csrf, seals_in_background, sessions, unit_of_work
from ..input_guard import MAX_ROW_ID
from . import bp
from .openapi import OPENAPI
from .parsing import field, json_object

log = logging.getLogger("recon.api")
csrf.exempt(bp)  # bearer tokens, no cookies: CSRF does not apply


def _iso(value: datetime | None) -> str | None:
    return api_views.iso(value)


@bp.get("/openapi.json")
@public
def openapi():
    return jsonify(OPENAPI)


def _idempotent_intake(service):
    """POST with an Idempotency-Key: the service's answer, or the original one for the same key."""
    key = request.headers.get("Idempotency-Key")
    if not key:
        return error_response(400, "idempotency_key_required", "the Idempotency-Key header is required")
    if not valid_key(key):
        return error_response(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 printable characters"
        )
    body = json_object()
    actor = current_actor()
    try:
        # Both paths bound their lock wait (a request racing an uncommitted one with the same key
        # waits at most 10 s, then 409) inside their own statements: no round trip of its own.
        result = None
        if service is submit_message:  # in one round trip when it can be (None: it wrote nothing)
            result = submit_message_in_one_statement(
                sessions(), actor, key, body, seal_in_background=seals_in_background()
            )
        if result is None:
            with unit_of_work(defer_seal=True) as s:
                result = service(s, actor, key, body)
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as a replay.
        with unit_of_work() as s:
            existing = find_existing(s, api_views.actor_row(s, actor.id), key)
            if existing is None:
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress", code="idempotency_in_progress"
                ) from None
            result = replay_response(existing, request_fingerprint(body))
    except DBAPIError as exc:
        if "lock" in str(exc.orig).lower():
            raise Conflict(
                "a request with this Idempotency-Key is still in progress", code="idempotency_in_progress"
            ) from None
        raise
    response = jsonify(result.body)
    response.status_code = result.status_code
    response.headers["Location"] = f"/api/v1/messages/{result.body['id']}"
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    # One log line per request: the access log carries the key and this message id.
    g.message_id = result.body["id"]
    return response


@bp.post("/messages")
@requires(Permission.SUBMIT_MESSAGES)
def submit():
    return _idempotent_intake(submit_message)


@bp.post("/exceptions")
@requires(Permission.SUBMIT_MESSAGES)
def report_exception():
    """An interface engine hands a message that failed on its side to the reviewers."""
    return _idempotent_intake(report_failed_message)


@bp.get("/messages/<message_id>")
@requires(Permission.READ_MESSAGES)
def get_message(message_id: str):
    with unit_of_work(read_only=True) as s:
        return jsonify(api_views.message_view(s, current_actor(), message_id))


@bp.get("/exceptions")
@requires(Permission.VIEW_QUEUES)
def list_exceptions():
    args = request.args
    try:
        limit = min(max(int(args.get("limit", 50)), 1), 500)
    except ValueError:
        raise Invalid("limit must be an integer", code="invalid_parameter") from None
    with unit_of_work(read_only=True) as s:
        items, next_cursor = queries.list_exceptions(
            s,
            state=args.get("state") or None,
            category=args.get("category") or None,
            connection=args.get("connection") or None,
            q=args.get("q") or None,  # an id, control id, key, or a patient / order identifier
            limit=limit,
            cursor=args.get("cursor") or None,
        )
        return jsonify({"items": [queries.exception_summary(i) for i in items], "next_cursor": next_cursor})


@bp.get("/drift")
@requires(Permission.VIEW_QUEUES)
def drift_report():
    """Drift per connection: unacknowledged first sightings and counts by kind (24 h, 7 days)."""
    with unit_of_work(read_only=True) as s:
        now = utcnow()
        flags = drift.open_flags(s, now, limit=200)
        recent = drift.recent_by_connection(s, now)
    return jsonify(
        {
            "flags": [
                {
                    "id": f.id,
                    "connection": f.connection,
                    "kind": f.kind,
                    "first_seen_at": _iso(f.first_seen_at),
                    "where": f.where,
                    "detail": f.detail,
                    "example_exception_id": f.example_exception_id,
                    "count_24h": f.count_24h,
                }
                for f in flags
            ],
            "counts": [
                {"connection": name, "kind": kind, "last_24h": day, "last_7d": week}
                for name, kind, day, week in recent
            ],
        }
    )


@bp.get("/exceptions/<int:exception_id>")
@requires(Permission.VIEW_QUEUES, Permission.VIEW_PAYLOAD)
def get_exception(exception_id: int):
    with unit_of_work() as s:
        return jsonify(api_views.exception_view(s, current_actor().id, exception_id))


@bp.post("/exceptions/<int:exception_id>/decisions")
@requires(Permission.DECIDE)
def post_decision(exception_id: int):
    body = json_object()
    action = body.get("action")
    if not isinstance(action, str):
        raise Invalid("action is required", code="invalid_body")
    for name in ("reason", "reason_code", "payload", "password", "assignee"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise Invalid(f"{name} must be a string", code="invalid_body")
    expected = body.get("expected_version")
    if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
        raise Invalid("expected_version must be an integer", code="invalid_body")
    data = DecisionInput(
        action=action,
        reason=body.get("reason") or "",
        reason_code=body.get("reason_code"),
        payload=body.get("payload"),
        password=body.get("password"),
        assignee=body.get("assignee"),
        expected_version=expected,
    )
    with unit_of_work() as s:
        response = jsonify(api_views.record_decision(s, current_actor().id, exception_id, data))
    response.status_code = 201
    return response


def _parse_time(name: str) -> datetime | None:
    value = request.args.get(name)
    if not value:
        return None
    try:
        return parse_utc(value)
    except ValueError:
        raise Invalid(f"{name} must be an ISO 8601 timestamp", code="invalid_parameter") from None


@bp.get("/audit")
@requires(Permission.VIEW_AUDIT)
def audit_events():
    args = request.args
    try:
        limit = min(max(int(args.get("limit", 100)), 1), 1000)
        after = int(args.get("cursor") or 0)
        if not 0 <= after <= MAX_ROW_ID:
            raise ValueError
    except ValueError:
        raise Invalid("limit and cursor must be integers", code="invalid_parameter") from None
    with unit_of_work(read_only=True) as s:
        events = list(
            audit.iter_events(
                s,
                since=_parse_time("since"),
                until=_parse_time("until"),
                actor=args.get("actor") or None,
                action=args.get("action") or None,
                after_id=after,
                limit=limit + 1,
            )
        )
        more = len(events) > limit
        events = events[:limit]
        return jsonify(
            {
                "items": [event_json(e) for e in events],
                "next_cursor": str(events[-1].id) if more and events else None,
            }
        )


@bp.get("/audit/export")
@requires(Permission.EXPORT_AUDIT)
def audit_export_stream():
    fmt = request.args.get("format", "jsonl")
    if fmt not in audit_export.FORMATS:
        raise Invalid(f"format must be one of {', '.join(audit_export.FORMATS)}", code="invalid_parameter")
    since, until = _parse_time("since"), _parse_time("until")
    lines = audit_export.stream_export(
        sessions(), fmt, actor=current_actor().username, since=since, until=until
    )
    ext = {"csv": "csv", "jsonl": "jsonl", "fhir-ndjson": "ndjson"}[fmt]
    return Response(
        stream_with_context(lines),
        mimetype=audit_export.FORMATS[fmt],
        headers={"Content-Disposition": f'attachment; filename="audit-export.{ext}"'},
    )


@bp.post("/audit/verify")
@requires(Permission.VIEW_AUDIT)
def audit_verify():
    """Recompute the hash chain now (the console's Verify; `recon audit verify`)."""
    with unit_of_work(read_only=True) as s:
        return jsonify(api_views.verify_audit(s))


@bp.post("/drift/<int:flag_id>/acknowledge")
@requires(Permission.DECIDE)
def acknowledge_drift(flag_id: int):
    """Acknowledge a first sighting of a drift kind (audited), as on the dashboard."""
    with unit_of_work() as s:
        return jsonify(api_views.acknowledge_drift(s, current_actor().username, flag_id))


# --- maintenance windows (issue 6): pause / resume a connection ----------------------------------


@bp.post("/connections/<int:connection_id>/pause")
@requires(Permission.ADMIN)
def pause_connection(connection_id: int):
    """Pause a connection for maintenance: body {"reason", "until"?}; nothing is sent meanwhile."""
    from app.services import connections

    body = json_object()
    reason, until = field(body, "reason", str, required=True), field(body, "until", str)
    try:
        end = parse_utc(until) if until else None
    except ValueError:
        raise Invalid(f"until: not an ISO 8601 time: {until!r}", code="invalid_body") from None
    with unit_of_work() as s:
        connections.pause_connection(
            s, connection_id, reason=reason, until=end, actor=current_actor().username
        )
        return jsonify(api_views.connection_view(s, connection_id))


@bp.post("/connections/<int:connection_id>/resume")
@requires(Permission.ADMIN)
def resume_connection(connection_id: int):
    """End the maintenance window; what it held drains in order. Body {"reason"?} (optional)."""
    from app.services import connections

    reason = field(json_object(), "reason", str) if request.get_data() else None
    with unit_of_work() as s:
        released = connections.resume_connection(
            s, connection_id, actor=current_actor().username, reason=reason
        )
        return jsonify({**api_views.connection_view(s, connection_id), "released": released})
