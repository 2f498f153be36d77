"""Administrative changes (SPEC 3.4 admin, 5 Admin). Each one is audited in the caller's transaction.

Creating users, tokens, customers and connections lives in users.py / connections.py; this
module holds the updates an administrator makes afterwards.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import ApiToken, Connection, Customer, SlaRuleRow, User
from app.domain.delivery import Category
from app.domain.errors import Conflict, Invalid, NotFound

from . import audit
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
    session: so.Session, connection_id: int, enabled: bool, *, actor: str
) -> Connection:
    """Enable or disable a connection. A disabled connection's new messages become `config` exceptions."""
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


def delete_sla_rule(session: so.Session, rule_id: int, *, actor: str) -> None:
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
        details=details,
    )


def set_user_active(session: so.Session, user_id: int, active: bool, *, actor: User) -> User:
    """Deactivate (or reactivate) a user. A deactivated user can neither log in nor use tokens."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    if user.id == actor.id and not active:
        raise Conflict("you cannot deactivate your own account")
    if user.active == active:
        return user
    user.active = active
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
        details={"username": user.username, "role": user.role},
    )
    return user


def revoke_token(session: so.Session, token_id: int, *, actor: str) -> ApiToken:
    """Revoke an API token; it stops working on the next request."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is not None:
        raise Conflict("this token is already revoked")
    token.revoked_at = utcnow()
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="token.revoke",
        subject_type="user",
        subject_id=token.user_id,
        details={"token_id": token.id, "prefix": token.prefix},
    )
    return token
