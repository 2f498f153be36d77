"""CSV export of the queue view a person is looking at (issue 8): the same filters, the same
masking as the page (SPEC 3.4), every cell neutralised against spreadsheet formulas
(app.domain.csv_safe), at most MAX_EXPORT_ROWS rows, and the export itself audited."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import sqlalchemy.orm as so

from app.db.models import User
from app.domain.audit_chain import format_timestamp
from app.domain.csv_safe import neutralise_row
from app.domain.roles import mask_identifier, masks_patient_identifiers
from app.domain.sla import sla_status

from . import audit, queries
from .clock import utcnow

MAX_EXPORT_ROWS = 5000
COLUMNS = (
    "id",
    "state",
    "category",
    "sla_status",
    "sla_due_at",
    "message_type",
    "connection",
    "customer",
    "patient",
    "assignee",
    "idempotency_key",
    "control_id",
    "reason",
    "created_at",
)


def export_csv(
    session: so.Session, actor: User, queue: str, filters: dict[str, Any], now: datetime | None = None
) -> tuple[str, int, bool]:
    """(csv text, rows, truncated) for the view `queue` + `filters` as `actor` sees it; audited as
    `queue.export` in the caller's transaction. Raises what queue_page raises for bad filters."""
    now = now or utcnow()
    params = dict(filters)
    params["state"] = queries.queue_states(queue, params.get("state"))
    if queue in queries.CATEGORIES:
        params["category"] = queue
    masked = masks_patient_identifiers(actor.role)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    rows, cursor, truncated = 0, None, False
    while True:
        items, cursor = queries.list_exceptions(
            session, cursor=cursor, limit=min(queries.MAX_PAGE, MAX_EXPORT_ROWS - rows), now=now, **params
        )
        reasons = queries.failure_reasons(session, items, actor.role)
        for item in items:
            patient = item.message.patient_ref or ""
            writer.writerow(
                neutralise_row(
                    [
                        item.id,
                        item.state,
                        item.category,
                        sla_status(now, item.sla_started_at, item.sla_due_at).value,
                        format_timestamp(item.sla_due_at),
                        item.message_type,
                        item.connection.name,
                        item.customer.name,
                        mask_identifier(patient) if masked else patient,
                        item.assignee.username if item.assignee else "",
                        item.message.idempotency_key,
                        item.message.control_id or "",
                        reasons.get(item.id, ""),
                        format_timestamp(item.created_at),
                    ]
                )
            )
        rows += len(items)
        if cursor is None:
            break
        if rows >= MAX_EXPORT_ROWS:
            truncated = True
            break
    audit.record(
        session,
        actor=actor.username,
        action="queue.export",
        subject_type="queue",
        subject_id=queue,
        details={
            "format": "csv",
            "filters": {k: v for k, v in filters.items() if v},
            "rows": rows,
            "truncated": truncated,
            "masked": masked,
        },
    )
    return out.getvalue(), rows, truncated
