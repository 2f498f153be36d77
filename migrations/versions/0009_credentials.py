"""Credentials and separation of duties (issue 7): token expiry and creator, one-time enrollment
links, who created each account (the enrolment relation four-eyes compares), and the approval
password throttle (failures and a lock an admin clears).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _fk(table: str, column: str) -> None:
    # SQLite cannot add a constraint to an existing table without rebuilding it (which `users`,
    # referenced by most tables, must not be); the models declare the relation either way.
    if op.get_bind().dialect.name == "postgresql":
        op.create_foreign_key(f"fk_{table}_{column}", table, "users", [column], ["id"])


def upgrade() -> None:
    # Plain ADD COLUMNs (nullable): no table rebuild on SQLite or PostgreSQL.
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(), nullable=True))
    op.add_column("api_tokens", sa.Column("created_by_id", sa.Integer(), nullable=True))
    _fk("api_tokens", "created_by_id")
    op.add_column("users", sa.Column("created_by_id", sa.Integer(), nullable=True))
    _fk("users", "created_by_id")
    op.add_column("users", sa.Column("enrolled_by_id", sa.Integer(), nullable=True))
    _fk("users", "enrolled_by_id")
    op.add_column("users", sa.Column("approval_locked_at", sa.DateTime(), nullable=True))
    op.add_column("users", sa.Column("approval_lock_cleared_at", sa.DateTime(), nullable=True))
    op.create_table(
        "enrollment_links",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_by_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "approval_failures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("failed_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_approval_failures_user_time", "approval_failures", ["user_id", "failed_at"])


def downgrade() -> None:
    op.drop_index("ix_approval_failures_user_time", table_name="approval_failures")
    op.drop_table("approval_failures")
    op.drop_table("enrollment_links")
    for table, column in (
        ("users", "approval_lock_cleared_at"),
        ("users", "approval_locked_at"),
        ("users", "enrolled_by_id"),
        ("users", "created_by_id"),
        ("api_tokens", "created_by_id"),
        ("api_tokens", "expires_at"),
    ):
        if op.get_bind().dialect.name == "postgresql" and column in ("created_by_id", "enrolled_by_id"):
            op.drop_constraint(f"fk_{table}_{column}", table, type_="foreignkey")
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
