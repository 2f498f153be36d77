"""SPEC 3.3: SLA timers from the runtime policy; breached items are escalated once, by the system."""

from datetime import timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.db.models import AuditEvent, Decision, ExceptionItem, SlaRuleRow
from app.db.session import transaction
from app.services import audit
from app.services.clock import utcnow
from app.services.exceptions import escalate_breached
from tests.factories import make_exception

START = "2026-11-30 08:00:00"


def test_high_risk_item_gets_thirty_minutes_and_is_escalated_once_breached(sessions, users):
    with freeze_time(START):
        exc_id = make_exception(sessions, users["svc"], key="sla-1", category="ehr_rejected")
        with transaction(sessions) as s:
            item = s.get(ExceptionItem, exc_id)
            assert item.sla_due_at - item.sla_started_at == timedelta(
                minutes=30
            )  # MedicationRequest: high risk
            assert escalate_breached(s) == 0
    with freeze_time("2026-11-30 08:29:59"), transaction(sessions) as s:
        assert escalate_breached(s) == 0
    with freeze_time("2026-11-30 08:30:00"), transaction(sessions) as s:
        assert escalate_breached(s) == 1
    with freeze_time("2026-11-30 09:30:00"), transaction(sessions) as s:
        assert escalate_breached(s) == 0  # once
        item = s.get(ExceptionItem, exc_id)
        assert item.state == "escalated"
        decision = s.scalar(sa.select(Decision).where(Decision.exception_id == exc_id))
        assert (decision.actor, decision.action, decision.to_state) == ("system:sla", "escalate", "escalated")
        event = s.scalar(sa.select(AuditEvent).where(AuditEvent.action == "decision.escalate"))
        assert event.actor == "system:sla" and event.details["decision_id"] == decision.id
        assert audit.verify(s).ok


def test_per_customer_override_from_the_database(sessions, users):
    with freeze_time(START):
        first = make_exception(sessions, users["svc"], key="sla-2", category="code_set")
        with transaction(sessions) as s:
            customer_id = s.get(ExceptionItem, first).customer_id
            s.add(SlaRuleRow(customer_id=customer_id, category="code_set", risk=None, minutes=5))
        second = make_exception(sessions, users["svc"], key="sla-3", category="code_set")
        with transaction(sessions) as s:
            assert s.get(ExceptionItem, second).sla_due_at == utcnow() + timedelta(minutes=5)
