"""What the HTTP API reads and returns (SPEC 9.3): each function runs one use case in the
caller's unit of work and returns JSON-ready dicts, so API routes only parse, call and answer.

Changes go through the same services as the console (decide, admin, users, connections), so
they are authorised by the same rules and audited in the same transaction.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import (
    ApiToken,
    Attempt,
    Connection,
    Customer,
    Decision,
    ExceptionItem,
    Message,
    PayloadVersion,
    Replay,
    SlaRuleRow,
    User,
)
from app.domain.errors import Conflict, Invalid, NotFound
from app.domain.roles import Role
from app.domain.states import Action

from . import admin, audit, connections, drift, queries, users
from .clock import utcnow
from .exceptions import DecisionInput, decide, view_payload

# replays.state: requested -> approved (queued) -> claimed by a worker (running) -> settled
REPLAY_STATES = ("pending_approval", "rejected", "queued", "running", "succeeded", "failed", "lost")
MAX_REPLAY_PAGE = 200


def iso(value: datetime | None) -> str | None:
    """UTC timestamps as the API writes them: seconds, with a Z."""
    return value.isoformat(timespec="seconds") + "Z" if value else None


def actor_row(session: so.Session, actor_id: int) -> User:
    """The acting user as a row of this unit of work."""
    user = session.get(User, actor_id)
    if user is None:
        raise NotFound("the acting user no longer exists")
    return user


# --- messages and exceptions ----------------------------------------------------------------------


def attempt_json(a: Attempt) -> dict:
    return {
        "id": a.id,
        "trigger": a.trigger,
        "started_at": iso(a.started_at),
        "finished_at": iso(a.finished_at),
        "outcome": a.outcome,
        "category": a.category,
        "status_code": a.status_code,
        "request_summary": a.request_summary,
        "response_excerpt": a.response_excerpt,
        "detail": a.detail,
        "latency_ms": a.latency_ms,
        "issues": a.issues or [],
    }


def decision_json(d: Decision) -> dict:
    return {
        "id": d.id,
        "action": d.action,
        "actor": d.actor,
        "reason": d.reason,
        "reason_code": d.reason_code,
        "from_state": d.from_state,
        "to_state": d.to_state,
        "details": d.details,
        "created_at": iso(d.created_at),
    }


def replay_json(r: Replay) -> dict:
    return {
        "id": r.id,
        "exception_id": r.exception_id,
        "message_id": r.message_id,
        "state": r.state,
        "corrected": r.corrected,
        "payload_version_id": r.payload_version_id,
        "requested_by": r.requested_by.username,
        "requested_at": iso(r.requested_at),
        "request_reason": r.request_reason,
        "approved_by": r.approved_by.username if r.approved_by else None,
        "approved_at": iso(r.approved_at),
        "started_at": iso(r.started_at),
        "finished_at": iso(r.finished_at),
        "result": r.result,
    }


def _attempts(session: so.Session, message_id: str) -> list[dict]:
    rows = session.scalars(sa.select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.id))
    return [attempt_json(a) for a in rows]


def message_view(session: so.Session, actor: User, message_id: str) -> dict:
    """GET /messages/{id}: status, attempts, the latest exception. Service accounts see only
    their own messages."""
    message = session.get(Message, message_id)
    if message is None or (actor.role == Role.SERVICE and message.client_id != actor.id):
        raise NotFound("message not found")
    exception = session.scalar(
        sa.select(ExceptionItem)
        .where(ExceptionItem.message_id == message.id)
        .order_by(ExceptionItem.id.desc())
    )
    return {
        "id": message.id,
        "idempotency_key": message.idempotency_key,
        "status": message.status,
        "connection": message.connection.name,
        "message_type": message.message_type,
        "control_id": message.control_id,
        "created_at": iso(message.created_at),
        "attempts": _attempts(session, message.id),
        "exception_id": exception.id if exception else None,
        "exception_state": exception.state if exception else None,
    }


def exception_view(session: so.Session, actor_id: int, exception_id: int) -> dict:
    """GET /exceptions/{id}: the item, its history and its current payload (an audited PHI view,
    written in this unit of work before the payload is returned)."""
    item = session.get(ExceptionItem, exception_id)
    if item is None:
        raise NotFound(f"exception {exception_id} not found")
    payload: PayloadVersion = view_payload(session, item, actor_row(session, actor_id), channel="api")
    out = queries.exception_summary(item)
    decisions = session.scalars(
        sa.select(Decision).where(Decision.exception_id == item.id).order_by(Decision.id)
    )
    replays = session.scalars(sa.select(Replay).where(Replay.exception_id == item.id).order_by(Replay.id))
    out.update(
        version=item.version,
        detail=item.detail,
        assignee=item.assignee.username if item.assignee else None,
        needs_not_applied_confirmation=item.needs_not_applied_confirmation,
        attempts=_attempts(session, item.message_id),
        decisions=[decision_json(d) for d in decisions],
        replays=[replay_json(r) for r in replays],
        payload=payload.text,
        encoding=payload.encoding,
        payload_sha256=payload.sha256,
        payload_version=payload.version,
        payload_base64=base64.b64encode(payload.raw).decode("ascii") if payload.encoding != "utf-8" else None,
    )
    return out


def record_decision(session: so.Session, actor_id: int, exception_id: int, data: DecisionInput) -> dict:
    """POST /exceptions/{id}/decisions: one decision through `decide`; the new state with it."""
    decision = decide(session, exception_id, actor_row(session, actor_id), data)
    state = session.get(ExceptionItem, exception_id).state
    return {"decision": decision_json(decision), "state": state}


# --- bulk decisions -------------------------------------------------------------------------------

# What the queue's bulk bar offers: never approve (that needs a password and a look at each item).
BULK_ACTIONS = (Action.RESUBMIT, Action.DISCARD, Action.ESCALATE, Action.ASSIGN, Action.CLAIM)
MAX_BULK = 200


@dataclass(frozen=True)
class BulkItemResult:
    exception_id: int
    ok: bool
    status: int  # 200 applied, else the refusal's HTTP status
    code: str
    message: str
    state: str | None = None


def bulk_decide(
    session_factory: so.sessionmaker,
    actor_id: int,
    refs: list[tuple[int, int | None]],
    template: DecisionInput,
) -> list[BulkItemResult]:
    """One action over a fixed list of (exception id, version the caller saw or None). Each item
    goes through `decide` in its own transaction, so one conflict does not undo the others."""
    from app.db.session import transaction
    from app.domain.errors import DomainError

    if template.action not in {a.value for a in BULK_ACTIONS}:
        allowed = ", ".join(a.value for a in BULK_ACTIONS)
        raise Invalid(f"bulk action must be one of {allowed}", code="invalid_action")
    if not refs:
        raise Invalid("ids must name at least one exception", code="invalid_body")
    if len(refs) > MAX_BULK:
        raise Invalid(f"at most {MAX_BULK} exceptions at a time", code="too_many")
    if len({i for i, _ in refs}) != len(refs):
        raise Invalid("an exception is named twice", code="invalid_body")
    results = []
    for exception_id, version in refs:
        data = DecisionInput(
            action=template.action,
            reason=template.reason,
            reason_code=template.reason_code if template.action == Action.DISCARD else None,
            assignee=template.assignee,
            expected_version=version,
        )
        try:
            with transaction(session_factory) as s:
                to_state = decide(s, exception_id, actor_row(s, actor_id), data).to_state
        except DomainError as exc:
            results.append(BulkItemResult(exception_id, False, exc.http_status, exc.code, exc.message))
        else:
            results.append(BulkItemResult(exception_id, True, 200, "applied", "applied", to_state))
    return results


# --- replays --------------------------------------------------------------------------------------


def replay_page(
    session: so.Session, *, state: str | None, limit: int, before_id: int | None
) -> tuple[list[dict], str | None]:
    """Replays newest first (keyset on id), optionally in one state."""
    if state is not None and state not in REPLAY_STATES:
        raise Invalid(f"state must be one of {', '.join(REPLAY_STATES)}", code="invalid_parameter")
    stmt = sa.select(Replay).options(
        so.selectinload(Replay.requested_by), so.selectinload(Replay.approved_by)
    )
    if state is not None:
        stmt = stmt.where(Replay.state == state)
    if before_id is not None:
        stmt = stmt.where(Replay.id < before_id)
    rows = list(session.scalars(stmt.order_by(Replay.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return [replay_json(r) for r in rows], str(rows[-1].id) if more and rows else None


def _replay(session: so.Session, replay_id: int) -> Replay:
    replay = session.get(Replay, replay_id)
    if replay is None:
        raise NotFound(f"replay {replay_id} not found")
    return replay


def replay_view(session: so.Session, replay_id: int) -> dict:
    return replay_json(_replay(session, replay_id))


def decide_replay(
    session: so.Session,
    actor_id: int,
    replay_id: int,
    *,
    action: str,
    reason: str,
    password: str | None,
    expected_version: int | None,
) -> dict:
    """Approve (password re-entry, never your own or a related request) or reject (reason) one
    pending replay: the decision the console's Approvals page makes, through `decide` on its
    exception."""
    replay = _replay(session, replay_id)
    if replay.state != "pending_approval":
        raise Conflict(f"replay {replay_id} is {replay.state}, not pending approval", code="state_conflict")
    data = DecisionInput(action=action, reason=reason, password=password, expected_version=expected_version)
    decision = decide(session, replay.exception_id, actor_row(session, actor_id), data)
    if decision.details.get("replay_id") != replay_id:  # another request became the pending one
        raise Conflict("the pending replay of this exception changed underneath", code="state_conflict")
    session.refresh(replay)
    return {
        "decision": decision_json(decision),
        "state": session.get(ExceptionItem, replay.exception_id).state,
        "replay": replay_json(replay),
    }


# --- admin: customers and connections ------------------------------------------------------------


def destructive_reason(reason: str | None) -> str:
    """Disable, deactivate, reset, revoke and delete need a reason, audited with the change
    (issue 8; the console asks for one too)."""
    reason = (reason or "").strip()
    if not reason:
        raise Invalid("say why: this change needs a reason", code="reason_required")
    return reason[:500]


def customer_json(c: Customer) -> dict:
    return {"id": c.id, "name": c.name, "created_at": iso(c.created_at)}


def customer_list(session: so.Session) -> list[dict]:
    return [customer_json(c) for c in queries.customers(session)]


def create_customer(session: so.Session, actor: str, name: str) -> dict:
    return customer_json(connections.add_customer(session, name, actor=actor))


def connection_json(c: Connection) -> dict:
    return {
        "id": c.id,
        "name": c.name,
        "customer": c.customer.name,
        "protocol": c.protocol,
        "endpoint": c.endpoint,
        "environment": c.environment,
        "vendor": c.vendor,
        "fhir_version": c.fhir_version,
        "conditional_create": c.supports_conditional_create,
        "identifier_search": c.supports_identifier_search,
        "diagnosis_code_system": c.diagnosis_code_system,
        "enabled_message_types": list(c.enabled_message_types or []),
        "enabled": c.enabled,
        "circuit": connections.circuit_state(c),
        "paused": connections.pause_state(c),
        "sequence_sensitive": c.sequence_sensitive,
        "max_auto_retries": c.max_auto_retries,
        "retry_backoff_seconds": c.retry_backoff_seconds,
        "circuit_failure_threshold": c.circuit_failure_threshold,
        "circuit_cooldown_seconds": c.circuit_cooldown_seconds,
        "created_at": iso(c.created_at),
    }


def connection_list(session: so.Session) -> list[dict]:
    return [connection_json(c) for c in queries.connections_overview(session)]


def _connection(session: so.Session, connection_id: int) -> Connection:
    conn = session.get(Connection, connection_id)
    if conn is None:
        raise NotFound(f"connection {connection_id} not found")
    return conn


def connection_view(session: so.Session, connection_id: int) -> dict:
    return connection_json(_connection(session, connection_id))


def create_connection(session: so.Session, actor: str, fields: dict) -> dict:
    """POST /connections: `fields` already type-checked by the route."""
    conn = connections.add_connection(
        session,
        fields["name"],
        customer=fields["customer"],
        protocol=fields["protocol"],
        endpoint=fields["endpoint"],
        environment=fields.get("environment", "prod"),
        conditional_create=fields.get("conditional_create", True),
        identifier_search=fields.get("identifier_search", True),
        vendor=fields.get("vendor") or "generic",
        fhir_version=fields.get("fhir_version") or "4.0.1",
        enabled_message_types=fields.get("enabled_message_types") or [],
        diagnosis_code_system=fields.get("diagnosis_code_system") or "icd-10",
        sequence_sensitive=fields.get("sequence_sensitive", False),
        actor=actor,
    )
    return connection_json(conn)


def update_connection(
    session: so.Session, actor: str, connection_id: int, changes: dict, *, reason: str | None = None
) -> dict:
    """PATCH /connections/{id}: enable/disable (disabling needs a reason) and the retry and
    circuit-breaker policy, each audited by the admin service like the console's forms."""
    conn = _connection(session, connection_id)
    if changes.get("enabled") is False and conn.enabled:
        reason = destructive_reason(reason)
    retry = {k: v for k, v in changes.items() if k in admin.RETRY_FIELDS}
    if retry:
        admin.update_retry_policy(session, conn.id, actor=actor, **retry)
    if "enabled" in changes:
        admin.set_connection_enabled(session, conn.id, changes["enabled"], actor=actor, reason=reason)
    if "sequence_sensitive" in changes:
        connections.set_sequence_sensitive(session, conn.id, changes["sequence_sensitive"], actor=actor)
    return connection_json(conn)


def reset_circuit(session: so.Session, actor: str, connection_id: int) -> dict:
    return connection_json(admin.reset_circuit(session, connection_id, actor=actor))


def probe_connection(session_factory: so.sessionmaker, actor: str, connection_id: int) -> dict:
    """The console's Test connection: probe the connection's own stored endpoint through its adapter (no
    message is delivered) outside any transaction, then audit the result."""
    from app.adapters.ehr.base import adapter_for
    from app.db.session import transaction
    from app.domain.errors import DomainError

    with transaction(session_factory, read_only=True) as s:
        settings = connections.settings_for(_connection(s, connection_id))
    try:
        connections.validated_endpoint(settings.protocol, settings.endpoint)
        with adapter_for(settings) as adapter:
            result = dict(adapter.check_connection())
    except DomainError as exc:
        result = {"ok": False, "detail": f"not probed: {exc.message}"}
    except Exception as exc:  # a failed probe is a result to report, not a 500
        result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    with transaction(session_factory) as s:
        admin.record_connection_test(s, connection_id, result, actor=actor)
    return {"ok": bool(result.get("ok")), "detail": str(result.get("detail") or "")[:500]}


# --- admin: SLA policy ----------------------------------------------------------------------------


def sla_rule_json(rule: SlaRuleRow, customer: str | None) -> dict:
    return {
        "id": rule.id,
        "category": rule.category,
        "risk": rule.risk,
        "customer": customer,
        "minutes": rule.minutes,
    }


def sla_rule_list(session: so.Session) -> list[dict]:
    return [sla_rule_json(rule, name) for rule, name in queries.sla_rules(session)]


def _customer_id(session: so.Session, name: str | None) -> int | None:
    if name is None:
        return None
    customer = session.scalar(sa.select(Customer).where(Customer.name == name))
    if customer is None:
        raise NotFound(f"customer {name!r} not found")
    return customer.id


def create_sla_rule(
    session: so.Session,
    actor: str,
    *,
    minutes: int,
    category: str | None,
    risk: str | None,
    customer: str | None,
) -> dict:
    rule = admin.add_sla_rule(
        session,
        minutes=minutes,
        category=category,
        risk=risk,
        customer_id=_customer_id(session, customer),
        actor=actor,
    )
    return sla_rule_json(rule, customer)


def update_sla_rule(session: so.Session, actor: str, rule_id: int, minutes: int) -> dict:
    rule = admin.update_sla_rule(session, rule_id, minutes, actor=actor)
    customer = session.get(Customer, rule.customer_id) if rule.customer_id else None
    return sla_rule_json(rule, customer.name if customer else None)


def delete_sla_rule(session: so.Session, actor: str, rule_id: int, reason: str | None) -> None:
    admin.delete_sla_rule(session, rule_id, actor=actor, reason=destructive_reason(reason))


# --- admin: users and service tokens --------------------------------------------------------------


def user_json(u: User) -> dict:
    return {
        "id": u.id,
        "username": u.username,
        "role": u.role,
        "active": u.active,
        "enrolled": u.password_hash is not None if u.role != Role.SERVICE else None,
        "approvals_locked": u.approval_locked_at is not None,
        "created_at": iso(u.created_at),
    }


def user_list(session: so.Session) -> list[dict]:
    return [user_json(u) for u in queries.all_users(session)]


def _user(session: so.Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def user_view(session: so.Session, user_id: int) -> dict:
    return user_json(_user(session, user_id))


@dataclass(frozen=True)
class NewUser:
    user: dict
    enrollment_secret: str | None  # a person's one-time link secret (shown once); None for a service


def create_user(session: so.Session, actor_id: int, username: str, role: str) -> NewUser:
    """An admin creates an account without a password: a person gets a one-time enrollment link
    to set their own; a service account gets tokens (issue 7)."""
    me = actor_row(session, actor_id)
    user = users.create_user(session, username, role, None, actor=me.username, created_by=me)
    secret = None if user.role == Role.SERVICE else users.issue_enrollment_link(session, user, actor=me)
    return NewUser(user_json(user), secret)


def update_user(
    session: so.Session, actor_id: int, user_id: int, changes: dict, *, reason: str | None = None
) -> dict:
    """PATCH /users/{id}: role and/or active (deactivating needs a reason), through the same
    services as the console."""
    me = actor_row(session, actor_id)
    user = _user(session, user_id)
    if changes.get("active") is False and user.active:
        reason = destructive_reason(reason)
    if "role" in changes:
        users.set_role(session, user, changes["role"], actor=me)
    if "active" in changes:
        admin.set_user_active(session, user.id, changes["active"], actor=me, reason=reason)
    return user_json(user)


def reset_password(session: so.Session, actor_id: int, user_id: int, reason: str | None) -> str:
    """A new one-time enrollment link for a person (the current password stops working)."""
    user, me = _user(session, user_id), actor_row(session, actor_id)
    return users.issue_enrollment_link(session, user, actor=me, reason=destructive_reason(reason))


def clear_approval_lock(session: so.Session, actor_id: int, user_id: int) -> dict:
    return user_json(users.clear_approval_lock(session, user_id, actor=actor_row(session, actor_id)))


def token_json(t: ApiToken) -> dict:
    return {
        "id": t.id,
        "user": t.user.username,
        "prefix": t.prefix,
        "created_at": iso(t.created_at),
        "expires_at": iso(t.expires_at),
        "last_used_at": iso(t.last_used_at),
        "revoked_at": iso(t.revoked_at),
    }


def token_list(session: so.Session) -> list[dict]:
    return [token_json(t) for t in queries.api_tokens(session)]


def create_service_token(session: so.Session, actor_id: int, username: str, days: int) -> dict:
    """An admin mints a token for a service account only (a person's account is 403)."""
    user = users.by_username(session, username)
    if user is None:
        raise NotFound(f"user {username!r} not found")
    token = users.create_service_token(session, user, actor=actor_row(session, actor_id), days=days)
    row = session.scalar(  # the row just flushed: the owner's newest token
        sa.select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc()).limit(1)
    )
    return {**token_json(row), "token": token}


def revoke_token(session: so.Session, actor: str, token_id: int, reason: str | None) -> dict:
    return token_json(admin.revoke_token(session, token_id, actor=actor, reason=destructive_reason(reason)))


# --- audit and drift ------------------------------------------------------------------------------


def verify_audit(session: so.Session) -> dict:
    """Recompute the hash chain now, like the console's Verify and `recon audit verify`."""
    result = audit.verify(session)
    return {
        "ok": result.ok,
        "events": result.count,
        "head": result.head,
        "broken_event_id": result.broken_id,
        "problem": result.problem or None,
        "checked_at": iso(utcnow()),
    }


def acknowledge_drift(session: so.Session, actor: str, flag_id: int) -> dict:
    kind = drift.acknowledge(session, flag_id, actor, utcnow())
    if kind is None:
        raise NotFound(f"drift flag {flag_id} not found")
    return {
        "id": kind.id,
        "kind": kind.kind,
        "acknowledged_at": iso(kind.acknowledged_at),
        "acknowledged_by": kind.acknowledged_by,
    }
