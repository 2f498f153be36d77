"""Liveness bookkeeping: outbox rows looked up by the work they carry (the latest job of each
unclaimed attempt or replay, without scanning the outbox's history); outbox rows released only at
`available_at`, and `replays.not_before`, for a replay deferred until an earlier request's window
has closed.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("available_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_outbox_kind_ref", ["kind", "ref_id", "id"], unique=False)
    with op.batch_alter_table("replays", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replays", schema=None) as batch_op:
        batch_op.drop_column("not_before")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_kind_ref")
        batch_op.drop_column("available_at")
