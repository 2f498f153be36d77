"""Pages flat in the number of rows (issue 6): the summary refresh also stores its rollups — the
per-queue totals, the dashboard's category × SLA matrix and its per-connection rows — so a page
reads one small row instead of re-aggregating `exception_counts`, whose groups grow with the
number of connections × categories × states (thousands at a million exceptions).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (as 0013): nothing references read_summaries, but batch mode is not needed.
    op.add_column("read_summaries", sa.Column("rollups", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35, PostgreSQL).
    op.execute("ALTER TABLE read_summaries DROP COLUMN rollups")
