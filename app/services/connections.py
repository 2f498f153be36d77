"""Customers, connections, circuit breaker state and SLA policy lookup."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import Connection, Customer, SlaRuleRow
from app.domain.delivery import ConnectionSettings, Outcome, Protocol, counts_against_breaker
from app.domain.errors import Conflict, Invalid, NotFound
from app.domain.sla import SlaPolicy, SlaRule

from . import audit
from .clock import utcnow

ENVIRONMENTS = ("prod", "test", "train")
DIAGNOSIS_CODE_SYSTEMS = ("icd-10", "icd-9", "any")  # what the EHR expects in diagnosis codes


def add_customer(session: so.Session, name: str, *, actor: str = "system:cli") -> Customer:
    name = (name or "").strip()
    if not name:
        raise Invalid("customer name is required")
    if session.scalar(sa.select(Customer).where(Customer.name == name)):
        raise Conflict(f"customer {name!r} exists")
    customer = Customer(name=name, created_at=utcnow())
    session.add(customer)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="customer.create",
        subject_type="customer",
        subject_id=customer.id,
        details={"name": name},
    )
    return customer


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")


def validated_endpoint(protocol: str, endpoint: str) -> str:
    """The endpoint, checked for its protocol: FHIR an http(s) URL with a host (no credentials,
    query or fragment: `javascript:` and `file:` are refused); MLLP a HOST:PORT. The connection's
    own endpoint is the only place its adapter (and "Test connection") ever calls."""
    endpoint = (endpoint or "").strip()
    if not endpoint:
        raise Invalid("endpoint is required")
    if any(ch.isspace() or not ch.isprintable() for ch in endpoint) or len(endpoint) > 500:
        raise Invalid("endpoint must be a single line without spaces (at most 500 characters)")
    if protocol == Protocol.FHIR_R4:
        try:
            parts = urlsplit(endpoint)
            port = parts.port
        except ValueError:
            raise Invalid(f"FHIR endpoint {endpoint!r} is not a valid URL") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not _HOST.match(parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
            or parts.username is not None
            or parts.query
            or parts.fragment
            or port == 0
        ):
            raise Invalid(f"FHIR endpoint {endpoint!r} must be an http:// or https:// base URL with a host")
        return endpoint
    from app.adapters.ehr.hl7v2_mllp import parse_endpoint

    try:
        host, _port = parse_endpoint(endpoint)
    except Exception as exc:
        raise Invalid(str(exc)) from None
    if not _HOST.match(host if ":" not in host else f"[{host}]"):
        raise Invalid(f"MLLP endpoint {endpoint!r} must be HOST:PORT")
    return endpoint


def add_connection(
    session: so.Session,
    name: str,
    *,
    customer: str,
    protocol: str,
    endpoint: str,
    environment: str = "prod",
    conditional_create: bool = True,
    identifier_search: bool = True,
    vendor: str = "generic",
    fhir_version: str = "4.0.1",
    enabled_message_types: list[str] | None = None,
    diagnosis_code_system: str = "icd-10",
    actor: str = "system:cli",
    **options,
) -> Connection:
    """Register one EHR instance of a customer; configuration changes are audited."""
    cust = session.scalar(sa.select(Customer).where(Customer.name == customer))
    if cust is None:
        raise NotFound(f"customer {customer!r} not found")
    try:
        Protocol(protocol)
    except ValueError:
        raise Invalid(f"unknown protocol {protocol!r}") from None
    if environment not in ENVIRONMENTS:
        raise Invalid(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    endpoint = validated_endpoint(protocol, endpoint)
    if diagnosis_code_system not in DIAGNOSIS_CODE_SYSTEMS:
        raise Invalid(f"diagnosis code system must be one of {', '.join(DIAGNOSIS_CODE_SYSTEMS)}")
    if session.scalar(sa.select(Connection).where(Connection.name == name)):
        raise Conflict(f"connection {name!r} exists")
    if protocol == Protocol.HL7V2_MLLP:
        # MLLP has no query for what was applied and no conditional create: an uncertain outcome
        # always needs a clinical lead's confirm_not_applied before a resend.
        conditional_create = identifier_search = False
    conn = Connection(
        name=name,
        customer_id=cust.id,
        vendor=vendor,
        environment=environment,
        protocol=protocol,
        endpoint=endpoint.rstrip("/"),
        fhir_version=fhir_version,
        supports_conditional_create=conditional_create,
        supports_identifier_search=identifier_search,
        enabled=True,
        enabled_message_types=list(enabled_message_types or []),
        diagnosis_code_system=diagnosis_code_system,
        created_at=utcnow(),
        **options,
    )
    session.add(conn)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="connection.create",
        subject_type="connection",
        subject_id=conn.id,
        details=connection_summary(conn),
    )
    return conn


def connection_summary(conn: Connection) -> dict:
    return {
        "name": conn.name,
        "customer_id": conn.customer_id,
        "protocol": conn.protocol,
        "endpoint": conn.endpoint,
        "environment": conn.environment,
        "vendor": conn.vendor,
        "conditional_create": conn.supports_conditional_create,
        "identifier_search": conn.supports_identifier_search,
        "enabled": conn.enabled,
        "diagnosis_code_system": conn.diagnosis_code_system,
        "sequence_sensitive": conn.sequence_sensitive,
    }


def settings_for(conn: Connection) -> ConnectionSettings:
    return ConnectionSettings(
        name=conn.name,
        protocol=conn.protocol,
        endpoint=conn.endpoint,
        fhir_version=conn.fhir_version,
        supports_conditional_create=conn.supports_conditional_create,
        supports_identifier_search=conn.supports_identifier_search,
        connect_timeout=conn.connect_timeout,
        read_timeout=conn.read_timeout,
        auth_token_url=conn.auth_token_url,
        auth_client_id=conn.auth_client_id,
        auth_secret_env=conn.auth_secret_env,
        enabled=conn.enabled,
        enabled_message_types=tuple(conn.enabled_message_types or ()),
        diagnosis_code_system=conn.diagnosis_code_system or "icd-10",
    )


def circuit_state(conn: Connection, now=None) -> str:
    """closed / open / half_open, derived from the stored counters."""
    now = now or utcnow()
    if conn.circuit_open_until is None:
        return "closed"
    return "open" if conn.circuit_open_until > now else "half_open"


def note_outcome_for_circuit(conn: Connection, outcome: Outcome) -> str | None:
    """Update the breaker after a real call. Returns the transition to audit: "opened" (from
    closed), "reopened" (the half-open probe failed), "closed" (a call succeeded while open or
    half-open), or None. A failure of a call that left before the circuit opened only extends it."""
    before = circuit_state(conn)
    if not counts_against_breaker(outcome):
        conn.consecutive_failures = 0
        conn.circuit_open_until = None
        conn.circuit_probe_until = None
        return "closed" if before != "closed" else None
    conn.consecutive_failures += 1
    if conn.consecutive_failures >= conn.circuit_failure_threshold:
        conn.circuit_open_until = utcnow() + timedelta(seconds=conn.circuit_cooldown_seconds)
        conn.circuit_probe_until = None
        return {"closed": "opened", "half_open": "reopened"}.get(before)
    return None


# --- maintenance windows and ordering (issue 6, "Faults") ----------------------------------------

PAUSE_RECHECK_SECONDS = 300.0  # a pause without an end: held items look again this often


def is_paused(conn: Connection, now=None) -> bool:
    """Paused for maintenance: nothing is sent until resumed (or until `paused_until` passes)."""
    now = now or utcnow()
    return conn.paused_at is not None and (conn.paused_until is None or conn.paused_until > now)


def pause_state(conn: Connection, now=None) -> dict | None:
    """What the console and the API show about a pause (None: not paused)."""
    if not is_paused(conn, now):
        return None
    return {
        "paused_at": conn.paused_at.isoformat() + "Z",
        "until": conn.paused_until.isoformat() + "Z" if conn.paused_until else None,
        "reason": conn.paused_reason,
        "by": conn.paused_by,
    }


def get_connection(session: so.Session, connection: int | str) -> Connection:
    """A connection by id or name (NotFound otherwise)."""
    conn = (
        session.get(Connection, connection) if isinstance(connection, int) else by_name(session, connection)
    )
    if conn is None:
        raise NotFound(f"connection {connection!r} not found")
    return conn


def pause_connection(
    session: so.Session, connection: int | str, *, reason: str, until=None, actor: str
) -> Connection:
    """Start a maintenance window: while paused nothing is sent to this EHR. Queued attempts and
    due retries are held (not sent, no retry spent, like an open circuit), approved replays wait;
    all of them drain in order on `resume_connection` (or when `until` passes). Audited
    (`connection.paused`); pausing a paused connection changes its reason and end."""
    reason = (reason or "").strip()
    if not reason:
        raise Invalid("a pause needs a reason", code="reason_required")
    now = utcnow()
    if until is not None and until <= now:
        raise Invalid("the pause must end in the future", code="invalid_until")
    conn = get_connection(session, connection)
    was = pause_state(conn, now)
    conn.paused_at = conn.paused_at if was else now
    conn.paused_until, conn.paused_reason, conn.paused_by = until, reason[:2000], actor[:80]
    audit.record(
        session,
        actor=actor,
        action="connection.paused",
        subject_type="connection",
        subject_id=conn.id,
        from_state="paused" if was else "active",
        to_state="paused",
        reason=reason[:500],
        details={"name": conn.name, "until": until.isoformat() + "Z" if until else None},
    )
    return conn


def resume_connection(
    session: so.Session, connection: int | str, *, actor: str, reason: str | None = None
) -> int:
    """End the maintenance window; audited (`connection.resumed`). What the pause held drains in
    order: the connection's retrying items (held attempts) become due now, oldest first, and its
    deferred replays are released. Returns how many items were released."""
    conn = get_connection(session, connection)
    now = utcnow()
    if conn.paused_at is None:
        raise Conflict(f"connection {conn.name} is not paused", code="not_paused")
    held_since = conn.paused_at
    conn.paused_at = conn.paused_until = conn.paused_reason = conn.paused_by = None
    return _end_window(
        session, conn, now, actor=actor, reason=(reason or "").strip()[:500] or None, paused_since=held_since
    )


def _end_window(
    session: so.Session, conn: Connection, now, *, actor: str, reason, paused_since, **details
) -> int:
    """A maintenance window just cleared on `conn`: what it held drains in order, and the end is
    audited (`connection.resumed`). Returns how many items were released."""
    released = drain_held(session, conn, now)
    audit.record(
        session,
        actor=actor,
        action="connection.resumed",
        subject_type="connection",
        subject_id=conn.id,
        from_state="paused",
        to_state="active",
        reason=reason,
        details={
            "name": conn.name,
            "paused_since": paused_since.isoformat() + "Z",
            **details,
            "released": released,
        },
    )
    return released


SYSTEM_ACTOR = "system"
WINDOW_ENDED = "the maintenance window ended"


def end_expired_pauses(session: so.Session, now=None) -> int:
    """Maintenance windows whose end (`until`) has passed, ended as a resume would end them: what
    they held drains in order and `connection.resumed` is audited (actor `system`, reason "the
    maintenance window ended") — without it the audit log showed a pause that never ended.
    Compare-and-set on the window as read: a window an admin changed or ended meanwhile is left
    as they left it, and two workers never end one window twice. Returns how many were ended."""
    now = now or utcnow()
    expired = session.execute(
        sa.select(Connection.id, Connection.paused_at, Connection.paused_until).where(
            Connection.paused_at.is_not(None), Connection.paused_until <= now
        )
    ).all()
    ended = 0
    for conn_id, paused_at, paused_until in expired:
        won = session.execute(
            sa.update(Connection)
            .where(
                Connection.id == conn_id,
                Connection.paused_at == paused_at,
                Connection.paused_until == paused_until,
            )
            .values(paused_at=None, paused_until=None, paused_reason=None, paused_by=None)
            .execution_options(synchronize_session="fetch")
        ).rowcount
        if won != 1:
            continue
        _end_window(
            session,
            session.get(Connection, conn_id),
            now,
            actor=SYSTEM_ACTOR,
            reason=WINDOW_ENDED,
            paused_since=paused_at,
            until=paused_until.isoformat() + "Z",
        )
        ended += 1
    return ended


def drain_held(session: so.Session, conn: Connection, now) -> int:
    """Make what waited on this connection due now: retrying items in their (next_retry_at, id)
    order — schedule_due_retries takes them in that order — and deferred replays."""
    from app.db.models import ExceptionItem, OutboxEntry, Replay
    from app.domain.states import ExceptionState, ReplayState

    items = session.execute(
        sa.update(ExceptionItem)
        .where(
            ExceptionItem.connection_id == conn.id,
            ExceptionItem.state == ExceptionState.RETRYING,
            ExceptionItem.next_retry_at > now,
        )
        .values(next_retry_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    waiting_replays = sa.select(sa.cast(Replay.id, sa.String)).where(
        Replay.state == ReplayState.QUEUED,
        Replay.exception_id.in_(sa.select(ExceptionItem.id).where(ExceptionItem.connection_id == conn.id)),
    )
    replays = session.execute(
        sa.update(OutboxEntry)
        .where(
            OutboxEntry.kind == "replay",
            OutboxEntry.relayed_at.is_(None),
            OutboxEntry.available_at > now,
            OutboxEntry.ref_id.in_(waiting_replays),
        )
        .values(available_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    return items + replays


def set_sequence_sensitive(
    session: so.Session, connection: int | str, value: bool, *, actor: str
) -> Connection:
    """Mark a connection sequence-sensitive (a later message for a patient waits behind an
    unresolved earlier one; app/services/ordering.py) or not. Audited."""
    conn = get_connection(session, connection)
    if conn.sequence_sensitive != value:
        conn.sequence_sensitive = value
        audit.record(
            session,
            actor=actor,
            action="connection.update",
            subject_type="connection",
            subject_id=conn.id,
            details={"sequence_sensitive": value},
        )
    return conn


def sla_policy(session: so.Session) -> SlaPolicy:
    rows = session.scalars(sa.select(SlaRuleRow)).all()
    return SlaPolicy([SlaRule(r.minutes, r.category, r.risk, r.customer_id) for r in rows])


def by_name(session: so.Session, name: str) -> Connection | None:
    return session.scalar(sa.select(Connection).where(Connection.name == name))
