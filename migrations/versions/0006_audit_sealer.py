"""The audit chain without a global lock (issue 6): events are recorded into `audit_pending`
in the use case's transaction (no lock), and one sealer at a time moves them into
`audit_events` in sequence order, computing prev_hash/hash and advancing `audit_head`.

* audit_pending: seq (never reused: AUTOINCREMENT on SQLite, a bigint identity on
  PostgreSQL) and the event's hashed fields.
* audit_events.seq: the staging row an event was sealed from (unique; NULL for older events).
* Triggers: audit_pending rejects UPDATE (and TRUNCATE on PostgreSQL); a DELETE is accepted
  only for a row whose sealed event exists with the same seq and the same content, so an
  event can leave the staging table only by entering the chain. audit_events keeps the
  append-only triggers of 0002.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# One row matches when the event in the chain is the pending row, field for field (the time as
# the same instant: the sealer writes it back in SQLAlchemy's text form).
_SAME_EVENT_SQLITE = (
    "e.seq = OLD.seq AND (e.occurred_at IS OLD.occurred_at "
    "OR julianday(e.occurred_at) = julianday(OLD.occurred_at)) AND e.actor IS OLD.actor "
    "AND e.action IS OLD.action AND e.subject_type IS OLD.subject_type "
    "AND e.subject_id IS OLD.subject_id AND e.from_state IS OLD.from_state "
    "AND e.to_state IS OLD.to_state AND e.reason IS OLD.reason "
    "AND e.reason_code IS OLD.reason_code AND e.details IS OLD.details"
)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "audit_pending",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("subject_type", sa.String(length=40), nullable=False),
        sa.Column("subject_id", sa.String(length=64), nullable=False),
        sa.Column("from_state", sa.String(length=20), nullable=True),
        sa.Column("to_state", sa.String(length=20), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reason_code", sa.String(length=40), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_pending")),
        sqlite_autoincrement=True,
    )
    op.add_column("audit_events", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.create_index("ux_audit_events_seq", "audit_events", ["seq"], unique=True)

    if sqlite:
        op.execute(
            "CREATE TRIGGER audit_pending_no_update BEFORE UPDATE ON audit_pending "
            "BEGIN SELECT RAISE(ABORT, 'audit_pending is append-only: UPDATE rejected'); END"
        )
        op.execute(
            "CREATE TRIGGER audit_pending_delete_sealed_only BEFORE DELETE ON audit_pending "
            f"WHEN NOT EXISTS (SELECT 1 FROM audit_events e WHERE {_SAME_EVENT_SQLITE}) "
            "BEGIN SELECT RAISE(ABORT, 'audit_pending is append-only: DELETE of an unsealed event "
            "rejected'); END"
        )
        return
    op.execute(
        """
        CREATE FUNCTION audit_pending_guard() RETURNS trigger AS $$
        DECLARE
            sealed audit_events%ROWTYPE;
        BEGIN
            IF TG_OP = 'DELETE' THEN
                -- By seq alone, so the only index the plan can use is ux_audit_events_seq (a plan
                -- on, say, the actor index scans every event of that actor for every row).
                SELECT * INTO sealed FROM audit_events WHERE seq = OLD.seq;
                IF FOUND
                   AND sealed.occurred_at = OLD.occurred_at
                   AND sealed.actor = OLD.actor
                   AND sealed.action = OLD.action
                   AND sealed.subject_type = OLD.subject_type
                   AND sealed.subject_id = OLD.subject_id
                   AND sealed.from_state IS NOT DISTINCT FROM OLD.from_state
                   AND sealed.to_state IS NOT DISTINCT FROM OLD.to_state
                   AND sealed.reason IS NOT DISTINCT FROM OLD.reason
                   AND sealed.reason_code IS NOT DISTINCT FROM OLD.reason_code
                   AND sealed.details::text = OLD.details::text
                THEN
                    RETURN OLD;
                END IF;
                RAISE EXCEPTION
                    'audit_pending is append-only: DELETE of an unsealed event rejected (seq %)', OLD.seq;
            END IF;
            RAISE EXCEPTION 'audit_pending is append-only: % rejected', TG_OP;
        END;
        $$ LANGUAGE plpgsql
        SET enable_seqscan = off
        """
    )
    op.execute(
        "CREATE TRIGGER audit_pending_guard_rows BEFORE UPDATE OR DELETE ON audit_pending "
        "FOR EACH ROW EXECUTE FUNCTION audit_pending_guard()"
    )
    op.execute(
        "CREATE TRIGGER audit_pending_no_truncate BEFORE TRUNCATE ON audit_pending "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_pending_guard()"
    )
    # A queue table: rows live for milliseconds. Vacuum it by its dead rows, not by its size.
    op.execute(
        "ALTER TABLE audit_pending SET (autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_vacuum_threshold = 5000, autovacuum_analyze_scale_factor = 0, "
        "autovacuum_analyze_threshold = 5000)"
    )


def downgrade() -> None:
    bind = op.get_bind()
    left = bind.execute(sa.text("SELECT count(*) FROM audit_pending")).scalar()
    if left:
        # Dropping them would lose audited events: seal first (`recon audit seal`).
        raise RuntimeError(f"{left} audit events are recorded but not sealed; run `recon audit seal` first")
    if bind.dialect.name == "sqlite":
        op.execute("DROP TRIGGER audit_pending_delete_sealed_only")
        op.execute("DROP TRIGGER audit_pending_no_update")
    else:
        op.execute("DROP TRIGGER audit_pending_no_truncate ON audit_pending")
        op.execute("DROP TRIGGER audit_pending_guard_rows ON audit_pending")
        op.execute("DROP FUNCTION audit_pending_guard()")
    op.drop_index("ux_audit_events_seq", table_name="audit_events")
    # Native DROP COLUMN (SQLite ≥ 3.35): a batch table copy would drop 0002's triggers.
    op.execute("ALTER TABLE audit_events DROP COLUMN seq")
    op.drop_table("audit_pending")
