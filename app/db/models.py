"""SQLAlchemy 2 typed models. Timestamps are naive UTC everywhere."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.domain.audit_chain import canonical_value

from .active import active_where


class Base(so.DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    __tablename__ = "users"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    username: so.Mapped[str] = so.mapped_column(sa.String(80), unique=True)
    password_hash: so.Mapped[str | None] = so.mapped_column(sa.String(255))
    role: so.Mapped[str] = so.mapped_column(sa.String(20))
    active: so.Mapped[bool] = so.mapped_column(default=True)
    created_at: so.Mapped[datetime]
    session_epoch: so.Mapped[int] = so.mapped_column(default=0, server_default="0")  # migration 0008
    # migration 0009: who created/enrolled the account (None: the CLI), and the approval lock
    created_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    # who issued the enrollment/reset link the current password was set through (None: own/CLI)
    enrolled_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    approval_locked_at: so.Mapped[datetime | None]
    approval_lock_cleared_at: so.Mapped[datetime | None]

    # flask-login protocol, kept free of Flask imports
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_active(self) -> bool:
        return self.active

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return str(self.id)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    user_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"), index=True)
    token_hash: so.Mapped[str] = so.mapped_column(sa.String(64), unique=True)
    prefix: so.Mapped[str] = so.mapped_column(sa.String(16))
    created_at: so.Mapped[datetime]
    last_used_at: so.Mapped[datetime | None]
    revoked_at: so.Mapped[datetime | None]
    expires_at: so.Mapped[datetime | None]  # migration 0009; None only for tokens made before it
    created_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    user: so.Mapped[User] = so.relationship(foreign_keys=[user_id])


class EnrollmentLink(Base):
    """A one-time link a new (or reset) console user opens to set their own password (0009)."""

    __tablename__ = "enrollment_links"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    user_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"), index=True)
    token_hash: so.Mapped[str] = so.mapped_column(sa.String(64), unique=True)
    created_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    created_at: so.Mapped[datetime]
    expires_at: so.Mapped[datetime]
    used_at: so.Mapped[datetime | None]


class ApprovalFailure(Base):
    """One wrong approval password (0009): five within 15 minutes lock the account's approvals."""

    __tablename__ = "approval_failures"
    __table_args__ = (sa.Index("ix_approval_failures_user_time", "user_id", "failed_at"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    user_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"))
    failed_at: so.Mapped[datetime]


class Customer(Base):
    __tablename__ = "customers"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    name: so.Mapped[str] = so.mapped_column(sa.String(120), unique=True)
    created_at: so.Mapped[datetime]


class Connection(Base):
    __tablename__ = "connections"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    name: so.Mapped[str] = so.mapped_column(sa.String(120), unique=True)
    customer_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("customers.id"), index=True)
    vendor: so.Mapped[str] = so.mapped_column(sa.String(60), default="generic")
    environment: so.Mapped[str] = so.mapped_column(sa.String(10), default="prod")
    protocol: so.Mapped[str] = so.mapped_column(sa.String(20))
    endpoint: so.Mapped[str] = so.mapped_column(sa.String(500))
    fhir_version: so.Mapped[str] = so.mapped_column(sa.String(10), default="4.0.1")
    # The diagnosis code system this EHR expects (icd-10 | icd-9 | any): the other one is code_set.
    diagnosis_code_system: so.Mapped[str] = so.mapped_column(sa.String(10), default="icd-10")
    # The EHR's CapabilityStatement as last seen (domain/capability.py); a change is drift.
    capability_summary: so.Mapped[str | None] = so.mapped_column(sa.Text)
    supports_conditional_create: so.Mapped[bool] = so.mapped_column(default=True)
    supports_identifier_search: so.Mapped[bool] = so.mapped_column(default=True)
    connect_timeout: so.Mapped[float] = so.mapped_column(default=5.0)
    read_timeout: so.Mapped[float] = so.mapped_column(default=30.0)
    auth_token_url: so.Mapped[str | None] = so.mapped_column(sa.String(500))
    auth_client_id: so.Mapped[str | None] = so.mapped_column(sa.String(200))
    auth_secret_env: so.Mapped[str | None] = so.mapped_column(sa.String(120))
    enabled: so.Mapped[bool] = so.mapped_column(default=True)
    enabled_message_types: so.Mapped[list] = so.mapped_column(sa.JSON, default=list)
    max_auto_retries: so.Mapped[int] = so.mapped_column(default=3)
    retry_backoff_seconds: so.Mapped[float] = so.mapped_column(default=30.0)
    circuit_failure_threshold: so.Mapped[int] = so.mapped_column(default=5)
    circuit_cooldown_seconds: so.Mapped[float] = so.mapped_column(default=60.0)
    consecutive_failures: so.Mapped[int] = so.mapped_column(default=0)
    circuit_open_until: so.Mapped[datetime | None]
    # Half-open: the one call allowed through to probe the EHR holds this until it settles.
    circuit_probe_until: so.Mapped[datetime | None]
    created_at: so.Mapped[datetime]
    # migration 0013: paused for maintenance (nothing sent; held items drain on resume), ordering
    # per patient, and the scheduled pinned-version check's last result (None: matches)
    paused_at: so.Mapped[datetime | None]
    paused_until: so.Mapped[datetime | None]
    paused_reason: so.Mapped[str | None] = so.mapped_column(sa.Text)
    paused_by: so.Mapped[str | None] = so.mapped_column(sa.String(80))
    sequence_sensitive: so.Mapped[bool] = so.mapped_column(default=False, server_default=sa.false())
    version_checked_at: so.Mapped[datetime | None]
    version_mismatch: so.Mapped[str | None] = so.mapped_column(sa.Text)
    customer: so.Mapped[Customer] = so.relationship()


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        sa.UniqueConstraint("client_id", "idempotency_key", name="uq_messages_client_key"),
        sa.Index("ix_messages_connection_patient", "connection_id", "patient_ref", "created_at"),  # 0013
    )
    id: so.Mapped[str] = so.mapped_column(sa.String(36), primary_key=True)
    client_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"))
    idempotency_key: so.Mapped[str] = so.mapped_column(sa.String(200), index=True)
    request_fingerprint: so.Mapped[str] = so.mapped_column(sa.String(64))
    response_json: so.Mapped[dict] = so.mapped_column(sa.JSON)
    connection_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("connections.id"), index=True)
    message_type: so.Mapped[str] = so.mapped_column(sa.String(40))
    content_type: so.Mapped[str] = so.mapped_column(sa.String(60))
    patient_ref: so.Mapped[str | None] = so.mapped_column(sa.String(200))
    clinical_risk: so.Mapped[str] = so.mapped_column(sa.String(10), default="normal")
    status: so.Mapped[str] = so.mapped_column(sa.String(20), index=True)
    delivery_system: so.Mapped[str] = so.mapped_column(sa.String(300))
    control_id: so.Mapped[str] = so.mapped_column(sa.String(20), index=True)
    # No FK: payload_versions already points at messages; the pair would be a cycle.
    current_payload_id: so.Mapped[int | None]
    created_at: so.Mapped[datetime]
    updated_at: so.Mapped[datetime]
    connection: so.Mapped[Connection] = so.relationship()
    client: so.Mapped[User] = so.relationship()
    current_payload: so.Mapped[PayloadVersion | None] = so.relationship(
        primaryjoin="foreign(Message.current_payload_id) == PayloadVersion.id", viewonly=True
    )


class PayloadVersion(Base):
    __tablename__ = "payload_versions"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    message_id: so.Mapped[str] = so.mapped_column(sa.ForeignKey("messages.id"), index=True)
    version: so.Mapped[int]
    raw: so.Mapped[bytes] = so.mapped_column(sa.LargeBinary)
    text: so.Mapped[str | None] = so.mapped_column(sa.Text)
    encoding: so.Mapped[str] = so.mapped_column(sa.String(40))
    sha256: so.Mapped[str] = so.mapped_column(sa.String(64))
    created_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    reason: so.Mapped[str | None] = so.mapped_column(sa.Text)
    created_at: so.Mapped[datetime]
    # Retention (app/services/phi.py): a purged version keeps sha256 and its size; raw is emptied.
    purged_at: so.Mapped[datetime | None]
    size_bytes: so.Mapped[int | None]


class MessageIdentifier(Base):
    """A patient or order identifier a message carries (app/domain/identifiers.py), for search."""

    __tablename__ = "message_identifiers"
    __table_args__ = (sa.Index("ix_message_identifiers_value", "value"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    message_id: so.Mapped[str] = so.mapped_column(sa.ForeignKey("messages.id"), index=True)
    kind: so.Mapped[str] = so.mapped_column(sa.String(30))
    value: so.Mapped[str] = so.mapped_column(sa.String(200))


class DriftCount(Base):
    """How often a kind of data-shape observation (app/domain/payloads.py DRIFT_KINDS) was seen on
    a connection, per hour: the per-connection counters over time."""

    __tablename__ = "drift_counts"
    __table_args__ = (sa.UniqueConstraint("connection_id", "kind", "hour", name="uq_drift_counts"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    connection_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("connections.id"))
    kind: so.Mapped[str] = so.mapped_column(sa.String(40))
    hour: so.Mapped[datetime]
    count: so.Mapped[int] = so.mapped_column(default=0)


class DriftKind(Base):
    """The first time a kind was seen on a connection: flagged as drift until someone acknowledges it."""

    __tablename__ = "drift_kinds"
    __table_args__ = (sa.UniqueConstraint("connection_id", "kind", name="uq_drift_kinds"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    connection_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("connections.id"))
    kind: so.Mapped[str] = so.mapped_column(sa.String(40))
    first_seen_at: so.Mapped[datetime]
    example_message_id: so.Mapped[str | None] = so.mapped_column(sa.String(36))
    where: so.Mapped[str] = so.mapped_column(sa.String(200), default="")
    detail: so.Mapped[str] = so.mapped_column(sa.String(500), default="")
    acknowledged_at: so.Mapped[datetime | None]
    acknowledged_by: so.Mapped[str | None] = so.mapped_column(sa.String(120))
    connection: so.Mapped[Connection] = so.relationship()


class ExceptionItem(Base):
    __tablename__ = "exceptions"
    __table_args__ = (
        # Over active rows only (app/db/active.py; migration 0007): the working set, not the history.
        # Category queues: state = open AND category = X, read in (sla_due_at, id) order.
        sa.Index(
            "ix_exceptions_queue",
            "state",
            "category",
            "sla_due_at",
            "id",
            postgresql_where=active_where(),
            sqlite_where=active_where(),
        ),
        # The "all" queue, SLA status filters (a range of sla_due_at).
        sa.Index(
            "ix_exceptions_active_due",
            "sla_due_at",
            "id",
            postgresql_where=active_where(),
            sqlite_where=active_where(),
        ),
        # One state (escalated, awaiting approval, a state filter; SLA escalation: open, due <= now),
        # and the customer / connection / category / assignee filters, each in (sla_due_at, id) order.
        *(
            sa.Index(
                f"ix_exceptions_active_{name}",
                column,
                "sla_due_at",
                "id",
                postgresql_where=active_where(),
                sqlite_where=active_where(),
            )
            for name, column in (
                ("state", "state"),
                ("category", "category"),
                ("customer", "customer_id"),
                ("connection", "connection_id"),
                ("assignee", "assignee_id"),
            )
        ),
        # Due retries, oldest due first.
        sa.Index(
            "ix_exceptions_retry_due",
            "next_retry_at",
            "id",
            postgresql_where=sa.text("state = 'retrying'"),
            sqlite_where=sa.text("state = 'retrying'"),
        ),
        # The dashboard's 24-hour trend: items resolved in the window (the rest are active).
        sa.Index(
            "ix_exceptions_resolved_at",
            "resolved_at",
            postgresql_where=sa.text("resolved_at IS NOT NULL"),
            sqlite_where=sa.text("resolved_at IS NOT NULL"),
        ),
        # Unfiltered listings across every state (the API without a state filter).
        sa.Index("ix_exceptions_sla", "sla_due_at", "id"),
        # Live pages' change check (queries.change_token): the newest write and a short window.
        sa.Index("ix_exceptions_updated_at", "updated_at", "version"),
    )
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    message_id: so.Mapped[str] = so.mapped_column(sa.ForeignKey("messages.id"), index=True)
    connection_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("connections.id"), index=True)
    customer_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("customers.id"), index=True)
    message_type: so.Mapped[str] = so.mapped_column(sa.String(40))
    category: so.Mapped[str] = so.mapped_column(sa.String(30))
    state: so.Mapped[str] = so.mapped_column(sa.String(20))
    version: so.Mapped[int] = so.mapped_column(default=1)
    detail: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    sla_started_at: so.Mapped[datetime]
    sla_due_at: so.Mapped[datetime]
    assignee_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"), index=True)
    needs_not_applied_confirmation: so.Mapped[bool] = so.mapped_column(default=False)
    retry_count: so.Mapped[int] = so.mapped_column(default=0)
    next_retry_at: so.Mapped[datetime | None] = so.mapped_column(index=True)
    created_at: so.Mapped[datetime]
    updated_at: so.Mapped[datetime]
    resolved_at: so.Mapped[datetime | None]
    message: so.Mapped[Message] = so.relationship()
    connection: so.Mapped[Connection] = so.relationship()
    customer: so.Mapped[Customer] = so.relationship()
    assignee: so.Mapped[User | None] = so.relationship()


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        sa.Index("ix_attempts_outcome_lease", "outcome", "lease_expires_at"),
        # Unclaimed deliveries in id order (the re-queue of lost hand-offs).
        sa.Index(
            "ix_attempts_queued",
            "id",
            postgresql_where=sa.text("outcome = 'queued'"),
            sqlite_where=sa.text("outcome = 'queued'"),
        ),
        # Attempts by outcome in a time window (the dashboard's 24 hours), index-only.
        sa.Index("ix_attempts_started", "started_at", "outcome"),
        # Attempts waiting behind an earlier message of the same patient (0013).
        sa.Index(
            "ix_attempts_held_behind",
            "held_behind",
            "id",
            postgresql_where=sa.text("held_behind IS NOT NULL"),
            sqlite_where=sa.text("held_behind IS NOT NULL"),
        ),
    )
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    message_id: so.Mapped[str] = so.mapped_column(sa.ForeignKey("messages.id"), index=True)
    replay_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("replays.id"))
    payload_version_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("payload_versions.id"))
    trigger: so.Mapped[str] = so.mapped_column(sa.String(40))
    started_at: so.Mapped[datetime]
    finished_at: so.Mapped[datetime | None]
    request_summary: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    status_code: so.Mapped[int | None]
    response_excerpt: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    # queued -> in_flight -> delivered | rejected | transient | unknown
    outcome: so.Mapped[str] = so.mapped_column(sa.String(20))
    lease_expires_at: so.Mapped[datetime | None]
    category: so.Mapped[str | None] = so.mapped_column(sa.String(30))
    detail: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    issues: so.Mapped[list] = so.mapped_column(sa.JSON, default=list)
    latency_ms: so.Mapped[int] = so.mapped_column(default=0)
    # Sequence-sensitive connections: the earlier message (id) this queued attempt waits behind.
    held_behind: so.Mapped[str | None] = so.mapped_column(sa.String(36))


class Decision(Base):
    __tablename__ = "decisions"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    exception_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("exceptions.id"), index=True)
    actor_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    actor: so.Mapped[str] = so.mapped_column(sa.String(80))  # username or system:<component>
    action: so.Mapped[str] = so.mapped_column(sa.String(40))
    reason: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    reason_code: so.Mapped[str | None] = so.mapped_column(sa.String(40))
    from_state: so.Mapped[str] = so.mapped_column(sa.String(20))
    to_state: so.Mapped[str] = so.mapped_column(sa.String(20))
    details: so.Mapped[dict] = so.mapped_column(sa.JSON, default=dict)
    created_at: so.Mapped[datetime]


class Replay(Base):
    __tablename__ = "replays"
    __table_args__ = (
        sa.Index("ix_replays_state_lease", "state", "lease_expires_at"),
        # Replays by state in a time window (the dashboard's 24 hours), index-only.
        sa.Index("ix_replays_requested", "requested_at", "state"),
    )
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    exception_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("exceptions.id"), index=True)
    message_id: so.Mapped[str] = so.mapped_column(sa.ForeignKey("messages.id"), index=True)
    payload_version_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("payload_versions.id"))
    state: so.Mapped[str] = so.mapped_column(sa.String(20))
    corrected: so.Mapped[bool] = so.mapped_column(default=False)
    requested_by_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"))
    requested_at: so.Mapped[datetime]
    request_reason: so.Mapped[str] = so.mapped_column(sa.Text, default="")
    approved_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    approved_at: so.Mapped[datetime | None]
    rejected_by_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("users.id"))
    lease_expires_at: so.Mapped[datetime | None]
    worker: so.Mapped[str | None] = so.mapped_column(sa.String(120))
    started_at: so.Mapped[datetime | None]
    finished_at: so.Mapped[datetime | None]
    result: so.Mapped[str | None] = so.mapped_column(sa.Text)
    # Set when the replay was deferred: an earlier request may be in the EHR's hands until then.
    not_before: so.Mapped[datetime | None]
    requested_by: so.Mapped[User] = so.relationship(foreign_keys=[requested_by_id])
    approved_by: so.Mapped[User | None] = so.relationship(foreign_keys=[approved_by_id])
    payload_version: so.Mapped[PayloadVersion] = so.relationship()


class OutboxEntry(Base):
    __tablename__ = "outbox"
    __table_args__ = (sa.Index("ix_outbox_kind_ref", "kind", "ref_id", "id"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    kind: so.Mapped[str] = so.mapped_column(sa.String(20))  # deliver | replay | retry
    ref_id: so.Mapped[str] = so.mapped_column(sa.String(64))
    job_id: so.Mapped[str] = so.mapped_column(sa.String(100))
    created_at: so.Mapped[datetime]
    relayed_at: so.Mapped[datetime | None] = so.mapped_column(index=True)
    # Not before this time (a replay deferred until an earlier request's window has closed).
    available_at: so.Mapped[datetime | None]


class CanonicalJSON(sa.types.TypeDecorator):
    """JSON written in the audit chain's canonical form (sorted keys, no whitespace, UTF-8
    kept): the stored text is then the very substring that was hashed, so `recon audit
    verify` and exports use it as it is, and the staging row and its sealed event compare
    equal as text. Reads as ordinary JSON."""

    impl = sa.JSON
    cache_ok = True

    def bind_processor(self, dialect):
        def process(value):
            return None if value is None else canonical_value(value)

        return process


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: so.Mapped[int] = so.mapped_column(primary_key=True, autoincrement=False)
    occurred_at: so.Mapped[datetime] = so.mapped_column(index=True)
    actor: so.Mapped[str] = so.mapped_column(sa.String(80), index=True)
    action: so.Mapped[str] = so.mapped_column(sa.String(60), index=True)
    subject_type: so.Mapped[str] = so.mapped_column(sa.String(40))
    subject_id: so.Mapped[str] = so.mapped_column(sa.String(64))
    from_state: so.Mapped[str | None] = so.mapped_column(sa.String(20))
    to_state: so.Mapped[str | None] = so.mapped_column(sa.String(20))
    reason: so.Mapped[str | None] = so.mapped_column(sa.Text)
    reason_code: so.Mapped[str | None] = so.mapped_column(sa.String(40))
    details: so.Mapped[dict] = so.mapped_column(CanonicalJSON, default=dict)
    prev_hash: so.Mapped[str] = so.mapped_column(sa.String(64))
    hash: so.Mapped[str] = so.mapped_column(sa.String(64))
    # The audit_pending sequence number the event was recorded under (NULL for events sealed
    # before migration 0006). Not hashed: it links a sealed event to its staging row.
    seq: so.Mapped[int | None] = so.mapped_column(sa.BigInteger)

    __table_args__ = (
        sa.Index("ix_audit_subject", "subject_type", "subject_id"),
        sa.Index("ux_audit_events_seq", "seq", unique=True),
    )

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "occurred_at": self.occurred_at,
            "actor": self.actor,
            "action": self.action,
            "subject_type": self.subject_type,
            "subject_id": self.subject_id,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class AuditHead(Base):
    """The chain's end: id and hash of the last sealed event. Only the sealer (one at a time)
    moves it, in the same transaction as the events it appends."""

    __tablename__ = "audit_head"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    last_id: so.Mapped[int] = so.mapped_column(default=0)
    last_hash: so.Mapped[str] = so.mapped_column(sa.String(64))


class AuditPending(Base):
    """Events recorded but not yet sealed into the chain (SPEC 6; docs/ARCHITECTURE.md "Audit
    log"). `record()` inserts here in the use case's transaction, without any lock; the sealer
    moves rows into audit_events in `seq` order. Triggers: no UPDATE, and DELETE only of a row
    whose sealed event (same seq, same content) exists."""

    __tablename__ = "audit_pending"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse a seq (audit_events.seq is unique)
    seq: so.Mapped[int] = so.mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    occurred_at: so.Mapped[datetime]
    actor: so.Mapped[str] = so.mapped_column(sa.String(80))
    action: so.Mapped[str] = so.mapped_column(sa.String(60))
    subject_type: so.Mapped[str] = so.mapped_column(sa.String(40))
    subject_id: so.Mapped[str] = so.mapped_column(sa.String(64))
    from_state: so.Mapped[str | None] = so.mapped_column(sa.String(20))
    to_state: so.Mapped[str | None] = so.mapped_column(sa.String(20))
    reason: so.Mapped[str | None] = so.mapped_column(sa.Text)
    reason_code: so.Mapped[str | None] = so.mapped_column(sa.String(40))
    details: so.Mapped[dict] = so.mapped_column(CanonicalJSON, default=dict)


class SlaRuleRow(Base):
    __tablename__ = "sla_rules"
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    customer_id: so.Mapped[int | None] = so.mapped_column(sa.ForeignKey("customers.id"))
    category: so.Mapped[str | None] = so.mapped_column(sa.String(30))
    risk: so.Mapped[str | None] = so.mapped_column(sa.String(10))
    minutes: so.Mapped[int]


class PhiViewMark(Base):
    """When a user's PHI view of one payload version of an exception was last audited: the
    server-side de-duplication window of `phi.view` events (app/services/phi.py)."""

    __tablename__ = "phi_view_marks"
    user_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    exception_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("exceptions.id"), primary_key=True)
    payload_version: so.Mapped[int] = so.mapped_column(primary_key=True, autoincrement=False)
    recorded_at: so.Mapped[datetime]


class SavedView(Base):
    """A named set of queue filters (issue 8): personal (its owner's) or shared with everyone who
    sees the queues. `query` is the filter part of the queue URL, as the page wrote it."""

    __tablename__ = "saved_views"
    __table_args__ = (sa.UniqueConstraint("owner_id", "name", name="uq_saved_views_owner_name"),)
    id: so.Mapped[int] = so.mapped_column(primary_key=True)
    owner_id: so.Mapped[int] = so.mapped_column(sa.ForeignKey("users.id"), index=True)
    name: so.Mapped[str] = so.mapped_column(sa.String(80))
    queue: so.Mapped[str] = so.mapped_column(sa.String(40))
    query: so.Mapped[str] = so.mapped_column(sa.String(1000), default="")
    shared: so.Mapped[bool] = so.mapped_column(default=False, index=True)
    created_at: so.Mapped[datetime]
    owner: so.Mapped[User] = so.relationship()
