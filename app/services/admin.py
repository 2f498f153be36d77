"""Administrative changes (SPEC 3.4 admin, 5 Admin). Each one is audited in the caller's transaction.

Creating users, tokens, customers and connections lives in users.py / connections.py; this
module holds the updates an administrator makes afterwards.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import ApiToken, Connection, Customer, SlaRuleRow, User
from app.domain.delivery import Category, ConnectionSettings
from app.domain.errors import Conflict, DomainError, Invalid, NotFound
from app.domain.roles import Role

from . import audit, connections, queries, users
from .clock import utcnow
from .users import end_sessions

RISKS = ("high", "normal")
MAX_SLA_MINUTES = 60 * 24 * 30


def _connection(session: so.Session, connection_id: int) -> Connection:
    conn = session.get(Connection, connection_id)
    if conn is None:
        raise NotFound(f"connection {connection_id} not found")
    return conn


def set_connection_enabled(
    session: so.Session, connection_id: int, enabled: bool, *, actor: str, reason: str | None = None
) -> Connection:
    """Enable or disable a connection. A disabled connection's new messages become `config` exceptions.
    The reason (the console requires one to disable) is audited."""
    conn = _connection(session, connection_id)
    if conn.enabled == enabled:
        return conn
    conn.enabled = enabled
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="connection.enable" if enabled else "connection.disable",
        subject_type="connection",
        subject_id=conn.id,
        from_state="disabled" if enabled else "enabled",
        to_state="enabled" if enabled else "disabled",
        reason=reason or None,
        details={"name": conn.name},
    )
    return conn


def reset_circuit(session: so.Session, connection_id: int, *, actor: str) -> Connection:
    """Close a connection's circuit breaker by hand (after the EHR team says it is back)."""
    conn = _connection(session, connection_id)
    before = {
        "consecutive_failures": conn.consecutive_failures,
        "circuit_open_until": conn.circuit_open_until,
    }
    conn.consecutive_failures = 0
    conn.circuit_open_until = None
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="connection.circuit_reset",
        subject_type="connection",
        subject_id=conn.id,
        details={
            "name": conn.name,
            "consecutive_failures": before["consecutive_failures"],
            "circuit_open_until": before["circuit_open_until"].isoformat() + "Z"
            if before["circuit_open_until"]
            else None,
        },
    )
    return conn


RETRY_FIELDS = {
    "max_auto_retries": (int, 0, 20),
    "retry_backoff_seconds": (float, 0.0, 3600.0),
    "circuit_failure_threshold": (int, 1, 1000),
    "circuit_cooldown_seconds": (float, 1.0, 86400.0),
}


def update_retry_policy(session: so.Session, connection_id: int, *, actor: str, **values) -> Connection:
    """Change a connection's retry and circuit-breaker settings (SPEC 5 'retry policies')."""
    conn = _connection(session, connection_id)
    changes = {}
    for name, value in values.items():
        if name not in RETRY_FIELDS:
            raise Invalid(f"unknown retry setting {name!r}")
        kind, low, high = RETRY_FIELDS[name]
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise Invalid(f"{name} must be a number") from None
        if not low <= value <= high:
            raise Invalid(f"{name} must be between {low} and {high}")
        if getattr(conn, name) != value:
            changes[name] = {"from": getattr(conn, name), "to": value}
            setattr(conn, name, value)
    if changes:
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="connection.retry_policy",
            subject_type="connection",
            subject_id=conn.id,
            details={"name": conn.name, "changes": changes},
        )
    return conn


def record_connection_test(session: so.Session, connection_id: int, result: dict, *, actor: str) -> None:
    """Audit a 'test connection' probe: it is an outbound call made on an admin's behalf."""
    conn = _connection(session, connection_id)
    audit.record(
        session,
        actor=actor,
        action="connection.test",
        subject_type="connection",
        subject_id=conn.id,
        details={
            "name": conn.name,
            "ok": bool(result.get("ok")),
            "detail": str(result.get("detail", ""))[:500],
        },
    )


def _rule_key(category: str | None, risk: str | None, customer_id: int | None):
    return (
        SlaRuleRow.category.is_(None) if category is None else SlaRuleRow.category == category,
        SlaRuleRow.risk.is_(None) if risk is None else SlaRuleRow.risk == risk,
        SlaRuleRow.customer_id.is_(None) if customer_id is None else SlaRuleRow.customer_id == customer_id,
    )


def add_sla_rule(
    session: so.Session,
    *,
    minutes: int,
    category: str | None = None,
    risk: str | None = None,
    customer_id: int | None = None,
    actor: str,
) -> SlaRuleRow:
    """Add one SLA policy rule (category × risk × optional customer → minutes).

    Applies to exceptions opened (or re-categorized) from now on; running timers keep their due time.
    """
    category = category or None
    risk = risk or None
    if category is not None and category not in {c.value for c in Category}:
        raise Invalid(f"unknown category {category!r}")
    if risk is not None and risk not in RISKS:
        raise Invalid(f"risk must be one of {', '.join(RISKS)}")
    if not isinstance(minutes, int) or not 1 <= minutes <= MAX_SLA_MINUTES:
        raise Invalid(f"minutes must be between 1 and {MAX_SLA_MINUTES}")
    customer_name = None
    if customer_id is not None:
        customer = session.get(Customer, customer_id)
        if customer is None:
            raise NotFound(f"customer {customer_id} not found")
        customer_name = customer.name
    if session.scalar(sa.select(SlaRuleRow).where(*_rule_key(category, risk, customer_id))):
        raise Conflict("a rule for this category, risk and customer exists; edit it instead")
    rule = SlaRuleRow(category=category, risk=risk, customer_id=customer_id, minutes=minutes)
    session.add(rule)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="sla_rule.create",
        subject_type="sla_rule",
        subject_id=rule.id,
        details={"category": category, "risk": risk, "customer": customer_name, "minutes": minutes},
    )
    return rule


def _rule(session: so.Session, rule_id: int) -> SlaRuleRow:
    rule = session.get(SlaRuleRow, rule_id)
    if rule is None:
        raise NotFound(f"SLA rule {rule_id} not found")
    return rule


def update_sla_rule(session: so.Session, rule_id: int, minutes: int, *, actor: str) -> SlaRuleRow:
    """Change the window of one SLA rule."""
    rule = _rule(session, rule_id)
    if not isinstance(minutes, int) or not 1 <= minutes <= MAX_SLA_MINUTES:
        raise Invalid(f"minutes must be between 1 and {MAX_SLA_MINUTES}")
    before = rule.minutes
    rule.minutes = minutes
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="sla_rule.update",
        subject_type="sla_rule",
        subject_id=rule.id,
        details={
            "category": rule.category,
            "risk": rule.risk,
            "customer_id": rule.customer_id,
            "minutes": {"from": before, "to": minutes},
        },
    )
    return rule


def delete_sla_rule(session: so.Session, rule_id: int, *, actor: str, reason: str | None = None) -> None:
    """Remove one SLA rule; lookups fall back to less specific rules or the built-in defaults."""
    rule = _rule(session, rule_id)
    details = {
        "category": rule.category,
        "risk": rule.risk,
        "customer_id": rule.customer_id,
        "minutes": rule.minutes,
    }
    session.delete(rule)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="sla_rule.delete",
        subject_type="sla_rule",
        subject_id=rule_id,
        reason=reason or None,
        details=details,
    )


def set_user_active(
    session: so.Session, user_id: int, active: bool, *, actor: User, reason: str | None = None
) -> User:
    """Deactivate (or reactivate) a user. A deactivated user can neither log in nor use tokens."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    if user.id == actor.id and not active:
        raise Conflict("you cannot deactivate your own account")
    if user.active == active:
        return user
    user.active = active
    users.tokens_changed(session)
    if not active:
        end_sessions(user)  # a later reactivation does not bring old sessions back
    session.flush()
    audit.record(
        session,
        actor=actor.username,
        action="user.activate" if active else "user.deactivate",
        subject_type="user",
        subject_id=user.id,
        from_state="inactive" if active else "active",
        to_state="active" if active else "inactive",
        reason=reason or None,
        details={"username": user.username, "role": user.role},
    )
    return user


def revoke_token(session: so.Session, token_id: int, *, actor: str, reason: str | None = None) -> ApiToken:
    """Revoke an API token; it stops working on the next request."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is not None:
        raise Conflict("this token is already revoked")
    token.revoked_at = utcnow()
    users.tokens_changed(session)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="token.revoke",
        subject_type="user",
        subject_id=token.user_id,
        reason=reason or None,
        details={"token_id": token.id, "prefix": token.prefix},
    )
    return token


# --- what the admin pages show, and the steps they take (the web layer runs no queries) ------------


def overview(session: so.Session) -> dict:
    """The admin landing page: users, connections with their circuit, SLA rules, active tokens."""
    conns = queries.connections_overview(session)
    return {
        "users": queries.all_users(session),
        "connections": conns,
        "circuits": {c.id: connections.circuit_state(c) for c in conns},
        "rules": queries.sla_rules(session),
        "active_tokens": [t for t in queries.api_tokens(session) if t.revoked_at is None],
    }


def users_overview(session: so.Session) -> dict:
    """Every user, who created each, and the clinical-lead grants."""
    user_list = queries.all_users(session)
    return {
        "users": user_list,
        "creators": {u.id: u.username for u in user_list},
        "grants": users.clinical_lead_grants(session),
    }


def tokens_overview(session: so.Session) -> list[ApiToken]:
    """Every API token (prefix only), newest first."""
    return queries.api_tokens(session)


def active_accounts(session: so.Session, *, service_only: bool = False) -> list[User]:
    """Active accounts (token owners); service accounts only when `service_only`."""
    return [
        u
        for u in queries.all_users(session)
        if u.active and (not service_only or u.role == Role.SERVICE.value)
    ]


def connections_overview(session: so.Session) -> dict:
    """Connections with their circuit state, and the customers."""
    conns = queries.connections_overview(session)
    return {
        "connections": conns,
        "customers": queries.customers(session),
        "circuits": {c.id: connections.circuit_state(c) for c in conns},
    }


def create_console_user(
    session: so.Session, username: str, role: str, *, actor_id: int
) -> tuple[str, str | None]:
    """Create a user; a person also gets a one-time enrollment link (the secret is returned once,
    never a password). Returns (username, secret or None for a service account)."""
    me = users.get(session, actor_id)
    user = users.create_user(session, username, role, None, actor=me.username, created_by=me)
    secret = None if user.role == Role.SERVICE.value else users.issue_enrollment_link(session, user, actor=me)
    return user.username, secret


def reset_password(
    session: so.Session, user_id: int, *, actor_id: int, reason: str | None = None
) -> tuple[str, str]:
    """Clear a person's password, end their sessions and issue a new one-time link (audited with
    the reason). Returns (username, secret)."""
    user = users.get(session, user_id)
    secret = users.issue_enrollment_link(session, user, actor=users.get(session, actor_id), reason=reason)
    return user.username, secret


def change_role(session: so.Session, user_id: int, role: str, *, actor_id: int) -> User:
    return users.set_role(session, users.get(session, user_id), role, actor=users.get(session, actor_id))


def clear_approval_lock(session: so.Session, user_id: int, *, actor_id: int) -> User:
    return users.clear_approval_lock(session, user_id, actor=users.get(session, actor_id))


def create_service_token(session: so.Session, user_id: int, *, actor_id: int, days: int) -> tuple[str, str]:
    """A token for a service account (a person's account is refused by the rule). Returns
    (owner's username, token shown once)."""
    user = users.get(session, user_id)
    token = users.create_service_token(session, user, actor=users.get(session, actor_id), days=days)
    return user.username, token


def connection_probe(session: so.Session, connection_id: int) -> tuple[ConnectionSettings, str]:
    """What 'Test connection' needs to probe outside any transaction: settings and name."""
    conn = _connection(session, connection_id)
    return connections.settings_for(conn), conn.name


def probe(settings: ConnectionSettings) -> dict:
    """Call the EHR through its adapter (no message is delivered): {"ok", "detail"}. Only the
    connection's own endpoint, and only one valid for its protocol; a failure is a result."""
    from app.adapters.ehr.base import adapter_for

    try:
        connections.validated_endpoint(settings.protocol, settings.endpoint)
        with adapter_for(settings) as adapter:
            return dict(adapter.check_connection())
    except DomainError as exc:
        return {"ok": False, "detail": f"not probed: {exc.message}"}
    except Exception as exc:  # a failed probe is a result to show, not a 500
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}


def sla_overview(session: so.Session) -> dict:
    return {"rules": queries.sla_rules(session), "customers": queries.customers(session)}
