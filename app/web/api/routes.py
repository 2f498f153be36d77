"""HTTP API v1 (SPEC 9.3): bearer tokens, JSON in and out, JSON errors."""

from __future__ import annotations

import base64
import logging
from datetime import datetime

import sqlalchemy as sa
from flask import Response, jsonify, request, stream_with_context
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.db.models import Attempt, Decision, ExceptionItem, Message, PayloadVersion, Replay, User
from app.domain.errors import Conflict, DomainError, Invalid, NotFound
from app.domain.idempotency import request_fingerprint, valid_key
from app.domain.roles import Permission, Role
from app.domain.timeparse import parse_utc
from app.services import audit, audit_export, drift, queries
from app.services.audit_export import event_json
from app.services.clock import utcnow
from app.services.exceptions import DecisionInput, decide, view_payload
from app.services.intake import find_existing, replay_response, submit_message
from app.services.intake import report_exception as report_failed_message

from ..access import current_actor, public, requires
from ..errors import error_response
from ..extensions import csrf, sessions, unit_of_work
from ..input_guard import MAX_ROW_ID
from . import bp
from .openapi import OPENAPI

log = logging.getLogger("recon.api")
csrf.exempt(bp)  # bearer tokens, no cookies: CSRF does not apply


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise DomainError("request body must be a JSON object", code="invalid_json")
    return body


@bp.get("/openapi.json")
@public
def openapi():
    return jsonify(OPENAPI)


def _idempotent_intake(service, what: str):
    """POST with an Idempotency-Key: the service's answer, or the original one for the same key."""
    key = request.headers.get("Idempotency-Key")
    if not key:
        return error_response(400, "idempotency_key_required", "the Idempotency-Key header is required")
    if not valid_key(key):
        return error_response(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1-200 printable characters"
        )
    body = _json_body()
    actor = current_actor()
    try:
        with unit_of_work() as s:
            if s.bind.dialect.name == "postgresql":
                # A request racing an uncommitted one with the same key waits at most this long.
                s.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            result = service(s, actor, key, body)
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as a replay.
        with unit_of_work() as s:
            existing = find_existing(s, s.get(User, actor.id), key)
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
    log.info(what, extra={"idempotency_key": key, "message_id": result.body["id"]})
    return response


@bp.post("/messages")
@requires(Permission.SUBMIT_MESSAGES)
def submit():
    return _idempotent_intake(submit_message, "message accepted")


@bp.post("/exceptions")
@requires(Permission.SUBMIT_MESSAGES)
def report_exception():
    """An interface engine hands a message that failed on its side to the reviewers."""
    return _idempotent_intake(report_failed_message, "exception reported")


def _attempt_json(a: Attempt) -> dict:
    return {
        "id": a.id,
        "trigger": a.trigger,
        "started_at": _iso(a.started_at),
        "finished_at": _iso(a.finished_at),
        "outcome": a.outcome,
        "category": a.category,
        "status_code": a.status_code,
        "request_summary": a.request_summary,
        "response_excerpt": a.response_excerpt,
        "detail": a.detail,
        "latency_ms": a.latency_ms,
        "issues": a.issues or [],
    }


@bp.get("/messages/<message_id>")
@requires(Permission.READ_MESSAGES)
def get_message(message_id: str):
    actor = current_actor()
    with unit_of_work(read_only=True) as s:
        message = s.get(Message, message_id)
        # Service accounts see only their own messages.
        if message is None or (actor.role == Role.SERVICE and message.client_id != actor.id):
            raise NotFound("message not found")
        attempts = s.scalars(
            sa.select(Attempt).where(Attempt.message_id == message.id).order_by(Attempt.id)
        ).all()
        exception = s.scalar(
            sa.select(ExceptionItem)
            .where(ExceptionItem.message_id == message.id)
            .order_by(ExceptionItem.id.desc())
        )
        return jsonify(
            {
                "id": message.id,
                "idempotency_key": message.idempotency_key,
                "status": message.status,
                "connection": message.connection.name,
                "message_type": message.message_type,
                "control_id": message.control_id,
                "created_at": _iso(message.created_at),
                "attempts": [_attempt_json(a) for a in attempts],
                "exception_id": exception.id if exception else None,
                "exception_state": exception.state if exception else None,
            }
        )


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


def _decision_json(d: Decision) -> dict:
    return {
        "id": d.id,
        "action": d.action,
        "actor": d.actor,
        "reason": d.reason,
        "reason_code": d.reason_code,
        "from_state": d.from_state,
        "to_state": d.to_state,
        "details": d.details,
        "created_at": _iso(d.created_at),
    }


def _replay_json(r: Replay) -> dict:
    return {
        "id": r.id,
        "state": r.state,
        "corrected": r.corrected,
        "payload_version_id": r.payload_version_id,
        "requested_by": r.requested_by.username,
        "requested_at": _iso(r.requested_at),
        "approved_by": r.approved_by.username if r.approved_by else None,
        "approved_at": _iso(r.approved_at),
        "started_at": _iso(r.started_at),
        "finished_at": _iso(r.finished_at),
        "result": r.result,
    }


@bp.get("/exceptions/<int:exception_id>")
@requires(Permission.VIEW_QUEUES, Permission.VIEW_PAYLOAD)
def get_exception(exception_id: int):
    actor = current_actor()
    with unit_of_work() as s:
        item = s.get(ExceptionItem, exception_id)
        if item is None:
            raise NotFound(f"exception {exception_id} not found")
        payload: PayloadVersion = view_payload(s, item, s.get(User, actor.id), channel="api")
        out = queries.exception_summary(item)
        out.update(
            version=item.version,
            detail=item.detail,
            assignee=item.assignee.username if item.assignee else None,
            needs_not_applied_confirmation=item.needs_not_applied_confirmation,
            attempts=[
                _attempt_json(a)
                for a in s.scalars(
                    sa.select(Attempt).where(Attempt.message_id == item.message_id).order_by(Attempt.id)
                )
            ],
            decisions=[
                _decision_json(d)
                for d in s.scalars(
                    sa.select(Decision).where(Decision.exception_id == item.id).order_by(Decision.id)
                )
            ],
            replays=[
                _replay_json(r)
                for r in s.scalars(
                    sa.select(Replay).where(Replay.exception_id == item.id).order_by(Replay.id)
                )
            ],
            payload=payload.text,
            encoding=payload.encoding,
            payload_sha256=payload.sha256,
            payload_version=payload.version,
            payload_base64=base64.b64encode(payload.raw).decode("ascii")
            if payload.encoding != "utf-8"
            else None,
        )
        return jsonify(out)


@bp.post("/exceptions/<int:exception_id>/decisions")
@requires(Permission.DECIDE)
def post_decision(exception_id: int):
    body = _json_body()
    action = body.get("action")
    if not isinstance(action, str):
        raise Invalid("action is required", code="invalid_body")
    for name in ("reason", "reason_code", "payload", "password", "assignee"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise Invalid(f"{name} must be a string", code="invalid_body")
    expected = body.get("expected_version")
    if expected is not None and not isinstance(expected, int):
        raise Invalid("expected_version must be an integer", code="invalid_body")
    actor = current_actor()
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
        decision = decide(s, exception_id, s.get(User, actor.id), data)
        state = s.get(ExceptionItem, exception_id).state
        response = jsonify({"decision": _decision_json(decision), "state": state})
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
