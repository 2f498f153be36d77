"""Bulk replay test data: many exceptions quickly, through the real intake and exception services."""

from __future__ import annotations

import sqlalchemy as sa

from app.db.models import Attempt, Message, OutboxEntry, User
from app.db.session import transaction
from app.services import intake
from app.services.clock import utcnow
from app.services.exceptions import open_exception
from tests.samples import medication_request, message_body


def rejected_orders(
    sessions, svc: User, count: int, *, connection: str = "mercy-epic", prefix: str = "bulk"
) -> list[int]:
    """`count` orders the EHR refused with a 422 before applying anything (provably not applied),
    each an open `ehr_rejected` exception; one transaction. Returns the exception ids in order.
    Keys are `<prefix>-<n>` so a test can count what the EHR applied per key."""
    ids = []
    with transaction(sessions) as s:
        client = s.get(User, svc.id)
        now = utcnow()
        for n in range(count):
            result = intake.submit_message(
                s, client, f"{prefix}-{n:04d}", message_body(connection, medication_request(n))
            )
            message = s.get(Message, result.body["id"])
            attempt = s.scalar(sa.select(Attempt).where(Attempt.message_id == message.id))
            attempt.outcome, attempt.status_code, attempt.category = "rejected", 422, "ehr_rejected"
            attempt.finished_at = attempt.started_at
            # the first delivery is over: its outbox row never becomes a job
            s.execute(
                sa.update(OutboxEntry)
                .where(OutboxEntry.kind == "deliver", OutboxEntry.ref_id == str(attempt.id))
                .values(relayed_at=now)
            )
            message.status = "exception"
            ids.append(open_exception(s, message, "ehr_rejected", "HTTP 422 from the EHR").id)
    return ids
