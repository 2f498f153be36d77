"""Hypothesis state machine over the real services and database (SPEC 3.1, 6):
three users request, approve, reject and discard at random. Whatever the order,
no replay runs unapproved or self-approved, every decision has exactly one audit
event, and the chain verifies."""

import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from app.db.models import AuditEvent, Decision, ExceptionItem, OutboxEntry, Replay, User
from app.db.session import transaction
from app.domain.errors import DomainError, Forbidden
from app.services import audit
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.factories import make_exception

ACTORS = ("rita", "lena", "leo")  # a reviewer and two clinical leads


def test_random_decision_sequences_keep_the_invariants(sessions, users):
    counter = iter(range(10**6))
    pick = st.integers(min_value=0, max_value=1)

    class Decisions(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            # Fresh exceptions for every example, so each one starts from `open`.
            self.ids = [make_exception(sessions, users["svc"], key=f"prop-{next(counter)}") for _ in range(2)]

        def _decide(self, exc_id, actor, data):
            try:
                with transaction(sessions) as s:
                    decide(s, exc_id, s.get(User, users[actor].id), data)
                return True
            except DomainError as exc:
                return exc

        @rule(exc=pick, actor=st.sampled_from(ACTORS), corrected=st.booleans())
        def request_replay(self, exc, actor, corrected):
            exc = self.ids[exc]
            if corrected:
                self._decide(
                    exc,
                    actor,
                    DecisionInput(
                        "resubmit_corrected",
                        reason="fixed the dose",
                        payload='{"resourceType": "MedicationRequest"}',
                    ),
                )
            else:
                self._decide(exc, actor, DecisionInput("resubmit", reason="EHR fixed"))

        @rule(exc=pick, actor=st.sampled_from(ACTORS), good_password=st.booleans())
        def approve(self, exc, actor, good_password):
            exc = self.ids[exc]
            with transaction(sessions) as s:
                pending = s.scalar(
                    sa.select(Replay).where(Replay.exception_id == exc, Replay.state == "pending_approval")
                )
                requester = pending.requested_by_id if pending else None
            result = self._decide(
                exc,
                actor,
                DecisionInput("approve", reason="ok", password=PASSWORD if good_password else "nope"),
            )
            if result is True:
                assert requester is not None and requester != users[actor].id and good_password
            elif requester == users[actor].id and users[actor].role == "clinical_lead":
                assert isinstance(result, Forbidden)

        @rule(exc=pick, actor=st.sampled_from(ACTORS))
        def reject(self, exc, actor):
            exc = self.ids[exc]
            self._decide(exc, actor, DecisionInput("reject", reason="not yet"))

        @rule(
            exc=pick,
            actor=st.sampled_from(ACTORS),
            code=st.sampled_from(["duplicate", "test_message", "other", "bogus", None]),
        )
        def discard(self, exc, actor, code):
            exc = self.ids[exc]
            self._decide(exc, actor, DecisionInput("discard", reason="cleanup", reason_code=code))

        @rule(exc=pick, actor=st.sampled_from(ACTORS))
        def escalate(self, exc, actor):
            exc = self.ids[exc]
            self._decide(exc, actor, DecisionInput("escalate", reason="needs a lead"))

        @invariant()
        def no_replay_runs_unapproved_or_self_approved(self):
            with transaction(sessions) as s:
                for replay in s.scalars(sa.select(Replay)):
                    if replay.state not in ("pending_approval", "rejected"):
                        assert replay.approved_by_id is not None
                        assert replay.approved_by_id != replay.requested_by_id
                queued = {
                    int(e.ref_id)
                    for e in s.scalars(sa.select(OutboxEntry).where(OutboxEntry.kind == "replay"))
                }
                approved = set(s.scalars(sa.select(Replay.id).where(Replay.approved_by_id.is_not(None))))
                assert queued == approved
                for item in s.scalars(sa.select(ExceptionItem).where(ExceptionItem.state == "replaying")):
                    assert (
                        s.scalar(
                            sa.select(Replay).where(Replay.exception_id == item.id, Replay.state == "queued")
                        )
                        is not None
                    )

        @invariant()
        def every_decision_has_exactly_one_audit_event(self):
            with transaction(sessions) as s:
                decision_ids = sorted(s.scalars(sa.select(Decision.id)))
                audited = sorted(
                    e.details["decision_id"]
                    for e in s.scalars(sa.select(AuditEvent).where(AuditEvent.action.like("decision.%")))
                )
                assert audited == decision_ids

        def teardown(self):
            with transaction(sessions) as s:
                assert audit.verify(s).ok

    run_state_machine_as_test(
        Decisions,
        settings=settings(
            max_examples=20,
            stateful_step_count=12,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
