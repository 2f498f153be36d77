"""Faults (issue 6): a connection paused for maintenance (who, why, until when), connections marked
sequence-sensitive with the attempt a later message holds behind an earlier one's, and the stored
result of the scheduled pinned-version check.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (not batch mode): on SQLite batch mode would recreate `connections`, which
    # other tables reference, and the foreign keys fail its DROP TABLE once rows exist.
    for column in (
        sa.Column("paused_at", sa.DateTime(), nullable=True),
        sa.Column("paused_until", sa.DateTime(), nullable=True),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("paused_by", sa.String(80), nullable=True),
        sa.Column("sequence_sensitive", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("version_checked_at", sa.DateTime(), nullable=True),
        sa.Column("version_mismatch", sa.Text(), nullable=True),
    ):
        op.add_column("connections", column)
    op.add_column("attempts", sa.Column("held_behind", sa.String(36), nullable=True))
    # The few attempts waiting behind an earlier message, by the message they wait for.
    op.create_index(
        "ix_attempts_held_behind",
        "attempts",
        ["held_behind", "id"],
        postgresql_where=sa.text("held_behind IS NOT NULL"),
        sqlite_where=sa.text("held_behind IS NOT NULL"),
    )
    # A sequence-sensitive connection's earlier messages for one patient.
    op.create_index(
        "ix_messages_connection_patient", "messages", ["connection_id", "patient_ref", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_messages_connection_patient", table_name="messages")
    op.drop_index("ix_attempts_held_behind", table_name="attempts")
    # Plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): batch mode would recreate `connections`,
    # which other tables reference, and SQLite enforces those foreign keys on the DROP TABLE.
    op.execute("ALTER TABLE attempts DROP COLUMN held_behind")
    for name in (
        "version_mismatch",
        "version_checked_at",
        "sequence_sensitive",
        "paused_by",
        "paused_reason",
        "paused_until",
        "paused_at",
    ):
        op.execute(f"ALTER TABLE connections DROP COLUMN {name}")
