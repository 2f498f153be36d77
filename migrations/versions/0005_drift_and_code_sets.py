"""Drift made visible: per-connection hourly counters of data-shape observations by kind, the
first sighting of each kind (flagged until acknowledged), and the diagnosis code system each
connection expects (ICD-9 sent to an ICD-10 EHR is a code_set exception), and the EHR's
CapabilityStatement as last seen (a change is drift); and the half-open probe's claim, so
only one call across all workers probes an EHR whose circuit is half-open.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("diagnosis_code_system", sa.String(length=10), nullable=False, server_default="icd-10")
        )
        batch_op.add_column(sa.Column("capability_summary", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("circuit_probe_until", sa.DateTime(), nullable=True))
    op.create_table(
        "drift_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("hour", sa.DateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"], ["connections.id"], name=op.f("fk_drift_counts_connection_id_connections")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_counts")),
        sa.UniqueConstraint("connection_id", "kind", "hour", name="uq_drift_counts"),
    )
    op.create_table(
        "drift_kinds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("example_message_id", sa.String(length=36), nullable=True),
        sa.Column("where", sa.String(length=200), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=120), nullable=True),
        sa.ForeignKeyConstraint(
            ["connection_id"], ["connections.id"], name=op.f("fk_drift_kinds_connection_id_connections")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_kinds")),
        sa.UniqueConstraint("connection_id", "kind", name="uq_drift_kinds"),
    )


def downgrade() -> None:
    op.drop_table("drift_kinds")
    op.drop_table("drift_counts")
    # Plain DROP COLUMN (SQLite ≥ 3.35): batch mode would recreate `connections`, which the
    # messages table references.
    op.execute("ALTER TABLE connections DROP COLUMN diagnosis_code_system")
    op.execute("ALTER TABLE connections DROP COLUMN capability_summary")
    op.execute("ALTER TABLE connections DROP COLUMN circuit_probe_until")
