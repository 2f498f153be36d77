"""PHI (issue 7): server-side de-duplication of PHI-view events per (user, exception, payload
version), and the retention purge's marker on payload versions (bytes removed; hash, size and
purge time kept).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "phi_view_marks",
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("exception_id", sa.Integer(), sa.ForeignKey("exceptions.id"), primary_key=True),
        sa.Column("payload_version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
    )
    # Plain ADD COLUMNs (nullable): no table rebuild on SQLite or PostgreSQL.
    op.add_column("payload_versions", sa.Column("purged_at", sa.DateTime(), nullable=True))
    op.add_column("payload_versions", sa.Column("size_bytes", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE payload_versions DROP COLUMN size_bytes")
    op.execute("ALTER TABLE payload_versions DROP COLUMN purged_at")
    op.drop_table("phi_view_marks")
