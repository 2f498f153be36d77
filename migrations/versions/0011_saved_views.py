"""Saved queue views, personal and shared (issue 8), and the index behind the live pages' cheap
change check (newest exceptions.updated_at and a short window of it).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saved_views",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("name", sa.String(80), nullable=False),
        sa.Column("queue", sa.String(40), nullable=False),
        sa.Column("query", sa.String(1000), nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("owner_id", "name", name="uq_saved_views_owner_name"),
    )
    op.create_index("ix_exceptions_updated_at", "exceptions", ["updated_at", "version"])


def downgrade() -> None:
    op.drop_index("ix_exceptions_updated_at", table_name="exceptions")
    op.drop_table("saved_views")
