"""Issue 5: HL7 v2 over MLLP through the same loop as FHIR, against the simulator's real MLLP
listener: AA delivers; AE/AR with ERR are rejections naming the field; no ACK, a late ACK or a
wrong MSA-2 are never success; a legacy-encoded name arrives intact; a replay reuses MSH-10."""

from __future__ import annotations

import base64
import uuid

import pytest
import sqlalchemy as sa

from app.db.models import Attempt, ExceptionItem, Message, PayloadVersion, User
from app.db.session import transaction
from app.domain.hl7 import ack_outcome
from app.services import connections
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD

HL7 = "x-application/hl7-v2+er7"


def adt(tenant: str, *, name: str = "DOE^JANE", birth: str = "19800101") -> str:
    return (
        f"MSH|^~\\&|RECON|MERCY|EHR|{tenant.upper()}|20261202101500||ADT^A08|ORIGINAL|P|2.5.1\r"
        f"PID|1||MRN-00042^^^MERCY^MR||{name}||{birth}|F\r"
        "PV1|1|I|4W^401^A"
    )


@pytest.fixture
def mllp(sessions, sim):
    """mllp(**options) -> tenant: an hl7v2-mllp connection 'mercy-lab' to a fresh simulator tenant
    (the tenant is the message's MSH-6)."""

    def make(endpoint: str | None = None, **options) -> str:
        tenant = f"h{uuid.uuid4().hex[:10]}"
        options = {"connect_timeout": 2.0, "read_timeout": 2.0, "retry_backoff_seconds": 0.0, **options}
        with transaction(sessions) as s:
            connections.add_customer(s, "Mercy Health")
            connections.add_connection(
                s,
                "mercy-lab",
                customer="Mercy Health",
                protocol="hl7v2-mllp",
                endpoint=endpoint or f"127.0.0.1:{sim.mllp_port}",
                **options,
            )
        return tenant

    return make


def submit(client, users, key: str, raw: bytes, message_type: str = "ADT^A08"):
    r = client.post(
        "/api/v1/messages",
        json={
            "connection": "mercy-lab",
            "message_type": message_type,
            "content_type": HL7,
            "payload_base64": base64.b64encode(raw).decode(),
        },
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json


def hl7_counts(sim_control, tenant: str) -> dict:
    r = sim_control.http.get(f"/_sim/tenants/{tenant}/hl7")
    r.raise_for_status()
    return r.json()


def outcome_of(sessions, message_id: str):
    with transaction(sessions, read_only=True) as s:
        message = s.get(Message, message_id)
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == message_id))
        attempts = s.scalars(
            sa.select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.id)
        ).all()
        return message, item, attempts


def test_a_cp1252_name_is_delivered_intact_with_our_msh10_and_its_bytes_kept(
    client, users, sessions, sim, sim_control, mllp, run_worker
):
    tenant = mllp()
    raw = adt(tenant, name="NUÑEZ – JR^MARÍA").encode("cp1252")
    accepted = submit(client, users, "adt-1", raw)
    run_worker()
    message, item, attempts = outcome_of(sessions, accepted["id"])
    assert message.status == "delivered" and item is None and attempts[-1].outcome == "delivered"
    with transaction(sessions, read_only=True) as s:
        assert s.get(PayloadVersion, message.current_payload_id).raw == raw  # stored as received
    assert hl7_counts(sim_control, tenant)["applied"] == {message.control_id: 1}
    received = sim.state.peek(tenant).hl7_last[message.control_id].decode("utf-8")
    assert "NUÑEZ – JR^MARÍA" in received  # the receiver reads the same name
    assert f"|ADT^A08|{message.control_id}|" in received  # MSH-10 is ours, derived from the key


def test_ae_with_err_is_a_rejection_that_names_the_field(
    client, users, sessions, sim_control, mllp, run_worker
):
    tenant = mllp()
    sim_control.set_profile(tenant, hl7_required_fields=["PID-7"])
    accepted = submit(client, users, "adt-2", adt(tenant, birth="").encode())
    run_worker()
    _, item, attempts = outcome_of(sessions, accepted["id"])
    assert (item.state, item.category) == ("open", "ehr_rejected")
    assert "ACK AE" in item.detail and "PID-7" in item.detail
    assert attempts[-1].issues[0]["expression"] == ["PID-7"]
    assert hl7_counts(sim_control, tenant)["applied"] == {}
    assert not item.needs_not_applied_confirmation  # the receiver said it did not apply it


def test_ar_is_a_rejection(client, users, sessions, sim_control, mllp, run_worker):
    tenant = mllp()
    sim_control.set_profile(tenant, rate_reject=1.0)
    accepted = submit(client, users, "adt-3", adt(tenant).encode())
    run_worker()
    _, item, _ = outcome_of(sessions, accepted["id"])
    assert item.category == "ehr_rejected" and "ACK AR" in item.detail


@pytest.mark.parametrize(
    ("profile", "category"),
    [
        ({"rate_commit_then_drop": 1.0}, "unknown_outcome"),  # applied, no ACK
        ({"latency_ms": 2500}, "unknown_outcome"),  # the ACK comes after our 1 s timeout
        ({"mllp_wrong_msa2": True}, "malformed_response"),  # an ACK for another message
    ],
)
def test_no_ack_a_late_ack_or_a_wrong_msa2_is_never_success(
    profile, category, client, users, sessions, sim_control, mllp, run_worker
):
    tenant = mllp(read_timeout=1.0)
    sim_control.set_profile(tenant, **profile)
    accepted = submit(client, users, f"adt-4-{category}-{len(profile)}", adt(tenant).encode())
    run_worker()
    message, item, _ = outcome_of(sessions, accepted["id"])
    assert message.status == "exception" and (item.state, item.category) == ("open", category)
    assert item.needs_not_applied_confirmation  # MLLP cannot be searched: a lead must confirm


def test_a_replay_after_a_lost_ack_reuses_msh10_and_a_deduplicating_receiver_applies_once(
    client, users, sessions, sim_control, mllp, run_worker, make_tokens
):
    tenant = mllp()
    sim_control.set_profile(tenant, rate_commit_then_drop=1.0)
    accepted = submit(client, users, "adt-5", adt(tenant).encode())
    run_worker()
    _, item, _ = outcome_of(sessions, accepted["id"])
    sim_control.set_profile(tenant, preset="default")  # de-duplicating on (MSH-3, MSH-4, MSH-10)
    with transaction(sessions) as s:
        decide(
            s,
            item.id,
            s.get(User, users["lena"].id),
            DecisionInput("confirm_not_applied", reason="checked the lab system's inbound log"),
        )
    with transaction(sessions) as s:
        decide(s, item.id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="resend"))
    with transaction(sessions) as s:
        decide(
            s, item.id, s.get(User, users["leo"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    run_worker()
    message, item, attempts = outcome_of(sessions, accepted["id"])
    assert item.state == "resolved" and message.status == "delivered"
    counts = hl7_counts(sim_control, tenant)
    assert counts["received"] == {message.control_id: 2} and counts["applied"] == {message.control_id: 1}
    assert all(message.control_id in a.request_summary for a in attempts)  # the same MSH-10 each time


def test_an_unreachable_receiver_is_transport_and_retried(
    client, users, sessions, closed_port, mllp, run_worker
):
    mllp(endpoint=f"127.0.0.1:{closed_port}", connect_timeout=1.0, max_auto_retries=0)
    accepted = submit(client, users, "adt-6", adt("nobody").encode())
    run_worker()
    _, item, attempts = outcome_of(sessions, accepted["id"])
    assert attempts[0].category == "transport" and item.category == "transport"
    assert not item.needs_not_applied_confirmation


ACKS = [
    ("MSA|AA|C1", "delivered", None),
    ("MSA|CA|C1", "delivered", None),
    ("MSA|AE|C1\rERR||PID^1^7|101^Required field missing^HL70357|E", "rejected", "ehr_rejected"),
    ("MSA|AR|C1", "rejected", "ehr_rejected"),
    ("MSA|CE|C1", "rejected", "ehr_rejected"),
    ("MSA|CR|C1", "rejected", "ehr_rejected"),
    ("MSA|AA|C2", "unknown", "malformed_response"),
    ("MSA|AA|", "unknown", "malformed_response"),
    ("MSA|ZZ|C1", "unknown", "malformed_response"),
    ("", "unknown", "malformed_response"),
]


@pytest.mark.parametrize(("tail", "outcome", "category"), ACKS)
def test_each_ack_shape_maps_to_its_category(tail, outcome, category):
    ack = "MSH|^~\\&|EHR|LAB|RECON|MERCY|20261202||ACK^A08|A1|P|2.5.1\r" + tail if tail else "not an ack"
    result = ack_outcome(ack, "C1")
    assert (
        result.outcome.value == outcome and (result.category.value if result.category else None) == category
    )


def test_two_hundred_messages_applied_exactly_once_with_a_non_deduplicating_receiver(
    client, users, sessions, sim_control, mllp, run_worker
):
    """The core loop's exactly-once test over MLLP: the receiver does NOT de-duplicate, drops 30%
    of ACKs after applying and resets 10% of connections before applying. Our side alone holds the
    invariant: an uncertain message is never resent until a person has checked the receiver —
    applied ones are discarded as applied_manually, the confirmed-not-applied ones resubmitted."""
    tenant = mllp()
    sim_control.set_profile(
        tenant, mllp_dedupe=False, rate_commit_then_drop=0.3, rate_reset=0.1, seed="mllp-exactly-once"
    )
    ids = [
        submit(client, users, f"adt-bulk-{n:03d}", adt(tenant, name=f"PATIENT^N{n}").encode())["id"]
        for n in range(200)
    ]
    run_worker()
    with transaction(sessions, read_only=True) as s:
        controls = dict(s.execute(sa.select(Message.id, Message.control_id).where(Message.id.in_(ids))).all())
    lena, leo, rita = (users[n].id for n in ("lena", "leo", "rita"))
    resent = 0
    for _ in range(6):  # reconciliation rounds: a resend can lose its ACK again
        with transaction(sessions, read_only=True) as s:
            uncertain = s.execute(
                sa.select(ExceptionItem.id, ExceptionItem.message_id).where(ExceptionItem.state == "open")
            ).all()
        if not uncertain:
            break
        applied = hl7_counts(sim_control, tenant)["applied"]
        for exc_id, message_id in uncertain:
            with transaction(sessions) as s:
                if applied.get(controls[message_id]):  # the lead looked in the receiving system
                    decide(
                        s,
                        exc_id,
                        s.get(User, rita),
                        DecisionInput("discard", reason="in the lab system", reason_code="applied_manually"),
                    )
                    continue
                decide(s, exc_id, s.get(User, lena), DecisionInput("confirm_not_applied", reason="not there"))
            with transaction(sessions) as s:
                decide(s, exc_id, s.get(User, rita), DecisionInput("resubmit", reason="resend"))
            with transaction(sessions) as s:
                decide(s, exc_id, s.get(User, leo), DecisionInput("approve", reason="ok", password=PASSWORD))
            resent += 1
        run_worker()
    assert not uncertain, "still uncertain after six rounds"
    assert resent >= 10  # the reset ones really went round the confirm-and-resend path
    final = hl7_counts(sim_control, tenant)["applied"]
    assert sorted(final) == sorted(controls.values())  # none lost
    assert set(final.values()) == {1}, {c: n for c, n in final.items() if n != 1}  # none twice
