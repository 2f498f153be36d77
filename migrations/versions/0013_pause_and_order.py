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
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("paused_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("paused_until", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("paused_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("paused_by", sa.String(80), nullable=True))
        batch.add_column(
            sa.Column("sequence_sensitive", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("version_checked_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("version_mismatch", sa.Text(), nullable=True))
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("held_behind", sa.String(36), nullable=True))
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
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("held_behind")
    with op.batch_alter_table("connections") as batch:
        for name in (
            "version_mismatch",
            "version_checked_at",
            "sequence_sensitive",
            "paused_by",
            "paused_reason",
            "paused_until",
            "paused_at",
        ):
            batch.drop_column(name)
