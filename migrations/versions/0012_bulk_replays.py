"""Bulk replay (issue 6): a fixed, listed batch approved once, released paced per connection
(bulk_replays, bulk_replay_items; app/db/bulk_replay_models.py).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_replays",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("pace_count", sa.Integer(), nullable=False),
        sa.Column("pace_seconds", sa.Float(), nullable=False),
        sa.Column("requested_by_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("approved_by_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=True),
        sa.Column("approved_at", sa.DateTime(), nullable=True),
        sa.Column("decided_by_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=True),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_bulk_replays_state", "bulk_replays", ["state", "id"])
    op.create_table(
        "bulk_replay_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bulk_replay_id", sa.Integer(), sa.ForeignKey("bulk_replays.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("exception_id", sa.Integer(), sa.ForeignKey("exceptions.id"), nullable=False),
        sa.Column("connection_id", sa.Integer(), sa.ForeignKey("connections.id"), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("release_at", sa.DateTime(), nullable=True),
        sa.Column("replay_id", sa.Integer(), sa.ForeignKey("replays.id"), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("note", sa.String(500), nullable=True),
        sa.UniqueConstraint("bulk_replay_id", "exception_id", name="uq_bulk_replay_items_exception"),
        sa.UniqueConstraint("replay_id", name="uq_bulk_replay_items_replay_id"),
    )
    op.create_index(
        "ix_bulk_replay_items_next",
        "bulk_replay_items",
        ["bulk_replay_id", "state", "connection_id", "position"],
    )
    op.create_index("ix_bulk_replay_items_state", "bulk_replay_items", ["state", "bulk_replay_id"])
    op.create_index("ix_bulk_replay_items_slot", "bulk_replay_items", ["connection_id", "release_at"])
    op.create_index("ix_bulk_replay_items_exception_id", "bulk_replay_items", ["exception_id"])


def downgrade() -> None:
    op.drop_index("ix_bulk_replay_items_exception_id", table_name="bulk_replay_items")
    op.drop_index("ix_bulk_replay_items_slot", table_name="bulk_replay_items")
    op.drop_index("ix_bulk_replay_items_state", table_name="bulk_replay_items")
    op.drop_index("ix_bulk_replay_items_next", table_name="bulk_replay_items")
    op.drop_table("bulk_replay_items")
    op.drop_index("ix_bulk_replays_state", table_name="bulk_replays")
    op.drop_table("bulk_replays")
