"""Session revocation (issue 7): a per-user session epoch. Every console session carries the
epoch it was opened under; logout, a password change and deactivation add one, which ends every
session of that user at once (signed cookies cannot be recalled one by one).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: no table rebuild on SQLite or PostgreSQL.
    op.add_column("users", sa.Column("session_epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite ≥ 3.35): batch mode would recreate `users`, which others reference.
    op.execute("ALTER TABLE users DROP COLUMN session_epoch")
