"""Pages flat in the number of rows (issue 6): partial indexes over active exceptions only, for
every queue order and filter, due retries, SLA escalation and the dashboard's 24-hour windows;
the summary tables the queue counts and the dashboard read; and the shared housekeeping schedule
(one worker runs each step per interval).

The predicate is written out here, frozen: app/db/active.py holds the same text, and queries
repeat it word for word so PostgreSQL and SQLite can prove each index applies.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ACTIVE = "state IN ('open', 'retrying', 'escalated', 'pending_approval', 'replaying')"
TASKS = ("escalate", "summaries", "retries", "stranded")


def _partial(name: str, table: str, columns: list[str], where: str) -> None:
    op.create_index(name, table, columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


def upgrade() -> None:
    # The queue index was over every row; now it covers the working set only.
    op.drop_index("ix_exceptions_queue", table_name="exceptions")
    _partial("ix_exceptions_queue", "exceptions", ["state", "category", "sla_due_at", "id"], ACTIVE)
    _partial("ix_exceptions_active_due", "exceptions", ["sla_due_at", "id"], ACTIVE)
    for name, column in (
        ("state", "state"),
        ("category", "category"),
        ("customer", "customer_id"),
        ("connection", "connection_id"),
        ("assignee", "assignee_id"),
    ):
        _partial(f"ix_exceptions_active_{name}", "exceptions", [column, "sla_due_at", "id"], ACTIVE)
    _partial("ix_exceptions_retry_due", "exceptions", ["next_retry_at", "id"], "state = 'retrying'")
    _partial("ix_exceptions_resolved_at", "exceptions", ["resolved_at"], "resolved_at IS NOT NULL")
    _partial("ix_attempts_queued", "attempts", ["id"], "outcome = 'queued'")
    op.create_index("ix_attempts_started", "attempts", ["started_at", "outcome"])
    op.create_index("ix_replays_requested", "replays", ["requested_at", "state"])

    op.create_table(
        "exception_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=30), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("sla_status", sa.String(length=10), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("oldest_created_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exception_counts")),
    )
    summaries = op.create_table(
        "read_summaries",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("counts_as_of", sa.DateTime(), nullable=True),
        sa.Column("refresh_ms", sa.Integer(), nullable=False),
        sa.Column("trends_as_of", sa.DateTime(), nullable=True),
        sa.Column("trends", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_read_summaries")),
    )
    tasks = op.create_table(
        "housekeeping_tasks",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("last_run_at", sa.DateTime(), nullable=True),
        sa.Column("holder", sa.String(length=120), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_housekeeping_tasks")),
    )
    op.bulk_insert(summaries, [{"id": 1, "refresh_ms": 0}])
    op.bulk_insert(tasks, [{"name": name} for name in TASKS])


def downgrade() -> None:
    op.drop_table("housekeeping_tasks")
    op.drop_table("read_summaries")
    op.drop_table("exception_counts")
    op.drop_index("ix_replays_requested", table_name="replays")
    op.drop_index("ix_attempts_started", table_name="attempts")
    op.drop_index("ix_attempts_queued", table_name="attempts")
    op.drop_index("ix_exceptions_resolved_at", table_name="exceptions")
    op.drop_index("ix_exceptions_retry_due", table_name="exceptions")
    for name in ("assignee", "connection", "customer", "category", "state", "due"):
        op.drop_index(f"ix_exceptions_active_{name}", table_name="exceptions")
    op.drop_index("ix_exceptions_queue", table_name="exceptions")
    op.create_index("ix_exceptions_queue", "exceptions", ["state", "category", "sla_due_at", "id"])
