"""The demo loader (seed.demo) and its corpus (seed.corpus).

The demo is loaded once per module into a fresh migrated database (the same template copy the
`sessions` fixture hands out) because loading takes a few seconds; one test also loads a
smaller demo with another seed through the `sessions` fixture itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from app.adapters.ehr.errors import ValidationFailed
from app.adapters.ehr.fhir_r4 import prepare_resource
from app.db.models import (
    Attempt,
    AuditEvent,
    AuditHead,
    Base,
    Connection,
    Decision,
    ExceptionItem,
    Message,
    OutboxEntry,
    PayloadVersion,
    Replay,
    User,
)
from app.db.session import session_factory, transaction
from app.domain.delivery import Category, Envelope
from app.domain.idempotency import request_fingerprint
from app.domain.roles import Role
from app.domain.sla import sla_status
from app.domain.states import FINAL_STATES, DiscardReason, ExceptionState
from app.services import audit, clock, users
from seed import corpus
from seed.demo import DEMO_PASSWORD, HISTORY, load_demo

NOW = datetime(2026, 3, 2, 12, 0, 0)
CONSOLE_ROLES = {Role.REVIEWER, Role.CLINICAL_LEAD, Role.AUDITOR, Role.ADMIN}


@pytest.fixture(scope="module")
def demo(db_template):
    """(sessions, result) for a database holding the default demo (size 300, seed 7)."""
    from app.db import session as session_module

    fresh, drop = db_template
    url = fresh()
    sessions = session_factory(url)
    result = load_demo(sessions, now=NOW)
    yield sessions, result
    session_module.get_engine(url).dispose()
    session_module._engines.pop(url, None)
    drop(url)


def _snapshot(sessions) -> dict:
    with transaction(sessions) as s:
        counts = {
            t.name: s.scalar(sa.select(sa.func.count()).select_from(t)) for t in Base.metadata.sorted_tables
        }
        head = s.get(AuditHead, 1)
        versions = s.execute(
            sa.select(ExceptionItem.id, ExceptionItem.version).order_by(ExceptionItem.id)
        ).all()
        return {"counts": counts, "head": (head.last_id, head.last_hash), "versions": versions}


# --------------------------------------------------------------------------- coverage


def test_demo_has_every_category_and_every_state(demo):
    sessions, result = demo
    assert result.created
    assert result.messages >= 300
    assert all(result.by_category[c.value] > 0 for c in Category), result.by_category
    assert all(result.by_state[s.value] > 0 for s in ExceptionState), result.by_state
    with transaction(sessions) as s:
        assert set(s.scalars(sa.select(ExceptionItem.category).distinct())) == {c.value for c in Category}
        assert set(s.scalars(sa.select(ExceptionItem.state).distinct())) == {
            st.value for st in ExceptionState
        }
        exceptions = s.scalar(sa.select(sa.func.count()).select_from(ExceptionItem))
    assert exceptions > result.messages / 2  # most messages became exceptions


def test_demo_sla_mix_is_mostly_on_track_with_some_at_risk_and_breached(demo):
    sessions, result = demo
    with transaction(sessions) as s:
        rows = s.execute(
            sa.select(ExceptionItem.sla_started_at, ExceptionItem.sla_due_at).where(
                ExceptionItem.state.not_in([st.value for st in FINAL_STATES])
            )
        ).all()
    statuses = Counter(sla_status(NOW, started, due).value for started, due in rows)
    assert statuses == Counter(result.by_sla)
    assert statuses["breached"] > 0 and statuses["at_risk"] > 0
    assert statuses["on_track"] > statuses["breached"] + statuses["at_risk"]


def test_every_discard_reason_code_is_used(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        codes = set(s.scalars(sa.select(Decision.reason_code).where(Decision.action == "discard")))
    assert codes == {code.value for code in DiscardReason}


def test_decision_history_has_every_action_and_four_eyes_approvals(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        actions = set(s.scalars(sa.select(Decision.action).distinct()))
        replays = s.scalars(sa.select(Replay).where(Replay.approved_by_id.is_not(None))).all()
        assert replays
        for replay in replays:
            assert replay.approved_by_id != replay.requested_by_id
            assert replay.approved_by.role == Role.CLINICAL_LEAD
        replay_states = set(s.scalars(sa.select(Replay.state).distinct()))
    assert actions == {
        "claim",
        "assign",
        "comment",
        "escalate",
        "discard",
        "resubmit",
        "resubmit_corrected",
        "approve",
        "reject",
        "confirm_not_applied",
    }
    assert {"pending_approval", "running", "succeeded", "failed", "rejected"} <= replay_states


def test_unknown_outcome_on_no_search_connection_is_confirmed_before_replay(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        no_search = dict(
            s.execute(
                sa.select(Connection.id, Connection.protocol).where(
                    Connection.supports_identifier_search.is_(False)
                )
            ).all()
        )
        # One FHIR EHR without identifier search, and every MLLP connection (MLLP cannot be searched).
        assert sorted(no_search.values()) == ["fhir-r4", "hl7v2-mllp", "hl7v2-mllp"]
        waiting = s.scalars(
            sa.select(ExceptionItem).where(
                ExceptionItem.connection_id.in_(no_search), ExceptionItem.needs_not_applied_confirmation
            )
        ).all()
        assert {no_search[e.connection_id] for e in waiting if e.category == "unknown_outcome"} == {
            "fhir-r4",
            "hl7v2-mllp",
        }
        # Anything that may have reached the EHR waits for a lead there, not only unknown_outcome.
        assert waiting and "unknown_outcome" in {e.category for e in waiting}
        assert {e.category for e in waiting} <= {
            "unknown_outcome",
            "ehr_unavailable",
            "malformed_response",
            "duplicate_suspected",
        }
        confirmed = s.scalars(
            sa.select(Decision.exception_id).where(Decision.action == "confirm_not_applied")
        ).all()
        assert confirmed
        for exception_id in confirmed:
            actions = s.scalars(
                sa.select(Decision.action).where(Decision.exception_id == exception_id).order_by(Decision.id)
            ).all()
            if "resubmit" in actions:
                assert actions.index("confirm_not_applied") < actions.index("resubmit")


# --------------------------------------------------------------------------- logins


def test_demo_has_logins_for_every_console_role_and_service_tokens(demo):
    sessions, result = demo
    assert {Role(role) for _, role, _ in result.logins} == CONSOLE_ROLES
    assert {password for _, _, password in result.logins} == {DEMO_PASSWORD}
    with transaction(sessions) as s:
        lead = users.by_username(s, "lena")
        assert users.check_password(lead, DEMO_PASSWORD)
        # Tokens expire (90 days): checked at the demo's own "now", not at the day this test runs.
        with freeze_time(NOW):
            assert users.user_for_token(s, result.service_token).username == "orders-service"
            assert users.user_for_token(s, result.service_tokens["interface-engine"]).role == Role.SERVICE


# --------------------------------------------------------------------------- integrity


def test_loading_twice_changes_nothing(demo):
    sessions, _ = demo
    before = _snapshot(sessions)
    again = load_demo(sessions, now=NOW + timedelta(hours=1))
    assert not again.created and again.service_token is None
    assert [name for name, _, _ in again.logins] == ["rita", "ravi", "lena", "leo", "audrey", "adam"]
    assert _snapshot(sessions) == before


def test_loading_restores_the_clock_and_password_hashing(demo):
    from app.services import clock, exceptions, intake

    assert (
        audit.utcnow is clock.utcnow and intake.utcnow is clock.utcnow and exceptions.utcnow is clock.utcnow
    )
    assert clock.utcnow.__module__ == "app.services.clock"
    assert abs(clock.utcnow() - datetime.now(UTC).replace(tzinfo=None)) < timedelta(seconds=5)
    assert exceptions.check_password is users.check_password
    assert users.hash_password.__module__ == "app.services.users"


def test_demo_refuses_a_now_in_the_future(sessions):
    with pytest.raises(ValueError, match="future"):
        load_demo(sessions, now=datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1))


def test_audit_chain_verifies_and_events_are_in_time_order(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        assert audit.verify(s).ok
        times = s.scalars(sa.select(AuditEvent.occurred_at).order_by(AuditEvent.id)).all()
    assert times == sorted(times)
    assert NOW - HISTORY - timedelta(hours=3) <= times[0] and times[-1] <= NOW
    assert times[-1] - times[0] > timedelta(days=2)  # spread over the history, not all "now"


def test_every_decision_has_exactly_one_audit_event(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        decisions = s.scalars(sa.select(Decision)).all()
        events = s.scalars(sa.select(AuditEvent).where(AuditEvent.action.like("decision.%"))).all()
    by_decision = Counter(e.details.get("decision_id") for e in events)
    assert len(decisions) == len(events)
    for d in decisions:
        assert by_decision[d.id] == 1, d.id
    event = {e.details["decision_id"]: e for e in events}
    assert all(
        event[d.id].action == f"decision.{d.action}" and event[d.id].actor == d.actor for d in decisions
    )


def test_data_shape_items_keep_the_exact_submitted_bytes(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        rows = s.execute(
            sa.select(Message, PayloadVersion)
            .join(ExceptionItem, ExceptionItem.message_id == Message.id)
            .join(
                PayloadVersion, sa.and_(PayloadVersion.message_id == Message.id, PayloadVersion.version == 1)
            )
            .where(ExceptionItem.category == "data_shape")
        ).all()
        corrected = s.scalar(
            sa.select(sa.func.count()).select_from(PayloadVersion).where(PayloadVersion.version > 1)
        )
        conn_names = dict(s.execute(sa.select(Connection.id, Connection.name)).all())
    assert rows and corrected
    kinds = Counter()
    for message, v1 in rows:
        assert hashlib.sha256(v1.raw).hexdigest() == v1.sha256
        base = {
            "connection": conn_names[message.connection_id],
            "message_type": message.message_type,
            "content_type": message.content_type,
        }
        as_base64 = {**base, "payload_base64": base64.b64encode(v1.raw).decode()}
        try:
            as_text = {**base, "payload": v1.raw.decode("utf-8")}
        except UnicodeDecodeError:
            as_text = None
            kinds["not utf-8"] += 1
        # The fingerprint is the SHA-256 of the body as submitted: v1 holds exactly those bytes.
        assert message.request_fingerprint in {
            request_fingerprint(as_base64),
            request_fingerprint(as_text) if as_text else None,
        }
        if as_text:
            try:
                json.loads(as_text["payload"])
            except ValueError:
                kinds["not json"] += 1
    assert kinds["not utf-8"] and kinds["not json"]


def test_seeded_history_is_not_sent_again_by_a_worker(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        unrelayed = s.scalar(
            sa.select(sa.func.count()).select_from(OutboxEntry).where(OutboxEntry.relayed_at.is_(None))
        )
        queued = s.scalar(sa.select(sa.func.count()).select_from(Attempt).where(Attempt.outcome == "queued"))
        retry_due = s.scalars(
            sa.select(ExceptionItem.next_retry_at).where(ExceptionItem.state == "retrying")
        ).all()
        replaying = s.scalars(sa.select(ExceptionItem.id).where(ExceptionItem.state == "replaying")).all()
        running = s.scalars(sa.select(Replay).where(Replay.exception_id.in_(replaying))).all()
        lost_workers = s.scalar(
            sa.select(sa.func.count())
            .select_from(Attempt)
            .where(Attempt.outcome == "in_flight", Attempt.replay_id.is_(None))
        )
    assert unrelayed == 0 and queued == 0 and lost_workers == 0
    assert retry_due and all(due > NOW for due in retry_due)
    assert running and all(r.state == "running" and r.lease_expires_at > NOW for r in running)


def test_other_seed_and_size_still_cover_everything(sessions):
    result = load_demo(sessions, now=NOW, size=60, seed=11, sim_base_url="http://sim.example:9000")
    assert result.created and result.messages == 60
    assert all(result.by_category.values()) and all(result.by_state.values())
    with transaction(sessions) as s:
        assert audit.verify(s).ok
        endpoints = dict(s.execute(sa.select(Connection.endpoint, Connection.protocol)).all())
        assert s.scalar(sa.select(sa.func.count()).select_from(User)) == 8  # 6 console + 2 service
    assert all(e.startswith("http://sim.example:9000/fhir/") for e, p in endpoints.items() if p == "fhir-r4")
    assert {e for e, p in endpoints.items() if p == "hl7v2-mllp"} == {"sim.example:2575"}  # one listener


# --------------------------------------------------------------------------- HL7 v2 over MLLP

HL7_REACHABLE = {c.value for c in Category} - {"auth"}  # MLLP has no credentials to expire


def test_demo_has_hl7_v2_over_mllp_delivered_and_in_every_category_it_can_reach(demo):
    _, result = demo
    hl7 = result.by_protocol["hl7v2-mllp"]
    assert hl7["delivered"] > 0 and all(hl7.get(c, 0) > 0 for c in HL7_REACHABLE), hl7
    assert set(result.by_protocol) == {"fhir-r4", "hl7v2-mllp"}
    for category, n in result.by_category.items():
        assert n == sum(p.get(category, 0) for p in result.by_protocol.values())


def test_hl7_outcomes_come_from_the_mllp_adapter_with_our_msh10(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        rows = s.execute(
            sa.select(Attempt, Message)
            .join(Message, Message.id == Attempt.message_id)
            .join(Connection, Connection.id == Message.connection_id)
            .where(Connection.protocol == "hl7v2-mllp", Attempt.finished_at.is_not(None))
        ).all()
        outcomes = Counter((a.outcome, a.category) for a, _ in rows)
        for attempt, message in rows:
            assert f"MSH-10={message.control_id}" in attempt.request_summary  # ours, on every attempt
            assert attempt.request_summary.startswith("MLLP 127.0.0.1:2575 ")
        rejected = [a for a, _ in rows if a.outcome == "rejected"]
        assert rejected and all(re.search(r"\rMSA\|A[ER]\|R", a.response_excerpt) for a in rejected)
        ae = [a for a in rejected if "MSA|AE|" in a.response_excerpt]
        assert ae and all(i["expression"] == ["PID-3"] for a in ae for i in a.issues)  # names the field
    assert {("delivered", None), ("unknown", "unknown_outcome"), ("unknown", "malformed_response")} <= set(
        outcomes
    )
    assert ("transient", "transport") in outcomes and ("rejected", "ehr_rejected") in outcomes


def test_hl7_payloads_are_kept_as_sent_in_their_own_character_sets(demo):
    sessions, _ = demo
    with transaction(sessions) as s:
        versions = s.execute(
            sa.select(Message, PayloadVersion)
            .join(PayloadVersion, PayloadVersion.message_id == Message.id)
            .where(Message.content_type == "x-application/hl7-v2+er7", PayloadVersion.version == 1)
        ).all()
        kinds = Counter()
        for message, v1 in versions:
            assert hashlib.sha256(v1.raw).hexdigest() == v1.sha256
            if b"|8859/1\r" in v1.raw or v1.raw.split(b"\r")[0].endswith(b"|8859/1"):
                kinds["latin-1"] += 1
                assert v1.encoding == "iso-8859-1" and v1.raw.decode("latin-1") == v1.text
                assert message.status == "delivered"
            if v1.raw.startswith(b"FHS|"):
                kinds["batch"] += 1
            if "Ã" in v1.text:
                kinds["mojibake"] += 1
                proposal = s.scalar(
                    sa.select(PayloadVersion).where(
                        PayloadVersion.message_id == message.id,
                        PayloadVersion.reason.like("proposed repair%"),
                    )
                )
                assert proposal is not None and "Ã" not in proposal.text
    assert kinds["latin-1"] and kinds["batch"] and kinds["mojibake"], kinds


def test_a_worker_started_after_loading_sends_nothing(sessions, runtime, run_worker):
    def no_network(conn):
        raise AssertionError(f"the worker tried to reach {conn.name} at start-up")

    load_demo(sessions, size=50, seed=3)  # now = the real current time, as `recon run` does
    with transaction(sessions) as s:
        breached_open = s.scalar(
            sa.select(sa.func.count())
            .select_from(ExceptionItem)
            .where(ExceptionItem.state == "open", ExceptionItem.sla_due_at <= clock.utcnow())
        )
    runtime.adapter_factory = no_network
    counts = run_worker()
    # Breached demo items are escalated to the clinical leads (SPEC 3.3): no network involved.
    assert counts == {
        "relayed": 0,
        "retries": 0,
        "reaped": 0,
        "escalated": breached_open,
        "requeued": 0,
        "jobs": 0,
    }


# --------------------------------------------------------------------------- corpus


def _envelope(doc: dict) -> Envelope:
    return Envelope(
        "m", doc["resourceType"], corpus.FHIR_JSON, corpus.to_text(doc), "urn:recon:idempotency:t", "k", "R"
    )


def _context(rng: random.Random) -> corpus.Context:
    return corpus.Context(
        patient=rng.choice(corpus.PATIENTS),
        patient_id="e1",
        mrn_system="urn:example:mrn",
        mrn="00000001",
        practitioner=rng.choice(corpus.PRACTITIONERS),
        encounter_id="enc-1",
        organization="Example Org",
        when=NOW,
        extra={"surviving_patient_id": "e2"},
    )


def test_corpus_well_formed_resources_and_corrections_pass_fhir_r4_validation():
    rng = random.Random(3)
    for _ in range(20):
        for message_type in corpus.MESSAGE_TYPES:
            prepare_resource(_envelope(corpus.well_formed(message_type, _context(rng), rng)))
        for quirk, extra in (
            (corpus.icd9_reason, ("ServiceRequest",)),
            (corpus.ndc_instead_of_rxnorm, ()),
            (corpus.local_lab_code, ()),
            (corpus.prescriber_not_active, ()),
            (corpus.no_dosage_instruction, ()),
            (corpus.merged_patient, ("Observation",)),
        ):  # valid FHIR that a particular EHR refuses, and its correction
            bad, fixed = quirk(_context(rng), rng, *extra)
            prepare_resource(_envelope(bad))
            prepare_resource(_envelope(fixed))
        for quirk, extra in (
            (corpus.missing_required_field, ("Encounter",)),
            (corpus.unusual_date_format, ()),
        ):
            bad, fixed = quirk(_context(rng), rng, *extra)
            with pytest.raises(ValidationFailed):
                prepare_resource(_envelope(bad))
            prepare_resource(_envelope(fixed))


def test_corpus_byte_level_quirks():
    rng = random.Random(5)
    ctx = _context(rng)
    ctx.patient = next(p for p in corpus.PATIENTS if p.key == "jose-nunez")
    doc = corpus.well_formed("Observation", ctx, rng)
    cp1252 = corpus.windows_1252_bytes(doc)
    with pytest.raises(UnicodeDecodeError):
        cp1252.decode("utf-8")
    assert cp1252.decode("cp1252") == corpus.to_text(doc)
    truncated = corpus.truncated_json(doc, rng)
    assert corpus.to_text(doc).encode().startswith(truncated)
    with pytest.raises(ValueError):
        json.loads(truncated.decode("utf-8"))
    assert corpus.with_bom(doc).startswith("\ufeff")
    assert {p.display for p in corpus.PATIENTS} >= {"José Núñez", "Zoë Ødegård", "Nguyễn Thị Hoa"}
