"""Patient and order identifiers per message (FHIR identifier / subject; HL7 PID-3, ORC-2/3,
OBR-2/3), indexed by value for the queue search; filled for existing messages from their payloads.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_identifiers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"], ["messages.id"], name=op.f("fk_message_identifiers_message_id_messages")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_identifiers")),
    )
    with op.batch_alter_table("message_identifiers", schema=None) as batch_op:
        batch_op.create_index("ix_message_identifiers_value", ["value"], unique=False)
        batch_op.create_index(batch_op.f("ix_message_identifiers_message_id"), ["message_id"], unique=False)
    _backfill()


def _backfill() -> None:
    """Existing messages: identifiers from their current payload, a keyset batch at a time."""
    from app.domain.identifiers import extract_identifiers

    bind = op.get_bind()
    select = sa.text(
        "SELECT m.id, m.content_type, p.text FROM messages m "
        "JOIN payload_versions p ON p.id = m.current_payload_id "
        "WHERE m.id > :last ORDER BY m.id LIMIT 500"
    )
    insert = sa.text("INSERT INTO message_identifiers (message_id, kind, value) VALUES (:m, :k, :v)")
    last = ""
    while True:
        rows = bind.execute(select, {"last": last}).all()
        if not rows:
            return
        batch = [
            {"m": message_id, "k": kind, "v": value}
            for message_id, content_type, text in rows
            for kind, value in extract_identifiers(content_type, text or "")
        ]
        if batch:
            bind.execute(insert, batch)
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("message_identifiers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_message_identifiers_message_id"))
        batch_op.drop_index("ix_message_identifiers_value")
    op.drop_table("message_identifiers")
