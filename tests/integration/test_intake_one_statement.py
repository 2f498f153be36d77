"""Intake in one round trip (app/services/intake.py, submit_message_in_one_statement): once a web
process has looked a connection up, a message for it that goes out is stored by one statement in
its own transaction — the same rows as the two-step path, nothing when the key is taken or the
connection's settings changed since (the two-step path then answers, as it always has)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from app.db.models import (
    Attempt,
    AuditEvent,
    AuditPending,
    Connection,
    Message,
    MessageIdentifier,
    OutboxEntry,
    PayloadVersion,
)
from app.db.session import transaction
from app.domain.delivery import deliver_job_id
from app.services import audit, intake, sealer
from tests.samples import medication_request, message_body

pytestmark = pytest.mark.postgres  # not collected without TEST_DATABASE_URL (tests/conftest.py)


@pytest.fixture
def app(database_url, redis_url):
    from app import create_app

    return create_app(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "TESTING": True,
            "RECON_SEAL_MODE": "background",
        }
    )


@pytest.fixture
def lookups(monkeypatch):
    """How many requests went through the two-step path's lookup."""
    calls = []
    real = intake._lookup

    def counting(*args, **kwargs):
        calls.append(args[2])  # the key
        return real(*args, **kwargs)

    monkeypatch.setattr(intake, "_lookup", counting)
    return calls


def _post(client, token, n, key=None, **overrides):
    body = {**message_body("mercy-epic", medication_request(n)), **overrides}
    return client.post(
        "/api/v1/messages",
        json=body,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key or f"one-{n}"},
    )


def _rows(s, message_id: str) -> dict:
    message = s.get(Message, message_id)
    payloads = s.scalars(sa.select(PayloadVersion).where(PayloadVersion.message_id == message_id)).all()
    attempts = s.scalars(sa.select(Attempt).where(Attempt.message_id == message_id)).all()
    outbox = s.scalars(
        sa.select(OutboxEntry).where(OutboxEntry.ref_id.in_([str(a.id) for a in attempts]))
    ).all()
    identifiers = s.execute(
        sa.select(MessageIdentifier.kind, MessageIdentifier.value).where(
            MessageIdentifier.message_id == message_id
        )
    ).all()
    events = s.scalars(sa.select(AuditEvent).where(AuditEvent.subject_id == message_id)).all()
    return {
        "message": message,
        "payloads": payloads,
        "attempts": attempts,
        "outbox": outbox,
        "identifiers": sorted(identifiers),
        "events": events,
    }


def _drain(app):
    assert sealer.for_factory(app.extensions["recon_sessions"]).drain(timeout=20)


def test_after_one_lookup_a_message_is_stored_in_one_statement_with_the_rows_of_the_two_step_path(
    app, lookups, users, fhir_connection, sessions
):
    client = app.test_client()
    first = _post(client, users["svc_token"], 1)
    second = _post(client, users["svc_token"], 1, key="one-2")  # the same order under another key
    assert (first.status_code, second.status_code) == (202, 202)
    assert lookups == ["one-1"]  # the second request never looked up
    assert second.json == {"id": second.json["id"], "idempotency_key": "one-2", "status": "queued"}
    assert second.headers["Location"] == f"/api/v1/messages/{second.json['id']}"
    _drain(app)
    with transaction(sessions, read_only=True) as s:
        a, b = _rows(s, first.json["id"]), _rows(s, second.json["id"])
        for rows, n in ((a, 1), (b, 2)):
            message = rows["message"]
            (payload,) = rows["payloads"]
            (attempt,) = rows["attempts"]
            (outbox,) = rows["outbox"]
            (event,) = rows["events"]
            assert message.status == "queued" and message.idempotency_key == f"one-{n}"
            assert message.current_payload_id == payload.id and payload.version == 1
            assert payload.reason == "intake" and payload.created_by_id == users["svc"].id
            assert attempt.payload_version_id == payload.id and attempt.outcome == "queued"
            assert attempt.trigger == "intake"
            assert (outbox.kind, outbox.job_id) == ("deliver", deliver_job_id(attempt.id))
            assert event.action == "message.receive" and event.actor == "svc" and event.to_state == "queued"
            assert message.response_json == {
                "id": message.id,
                "idempotency_key": f"one-{n}",
                "status": "queued",
            }
        same = (
            "connection_id",
            "message_type",
            "content_type",
            "clinical_risk",
            "delivery_system",
            "client_id",
        )
        assert [getattr(a["message"], c) for c in same] == [getattr(b["message"], c) for c in same]
        assert a["message"].patient_ref == b["message"].patient_ref is not None
        assert (
            a["payloads"][0].raw == b["payloads"][0].raw
            and a["payloads"][0].sha256 == b["payloads"][0].sha256
        )
        assert a["identifiers"] == b["identifiers"] and b["identifiers"]
        assert sorted(a["events"][0].details) == sorted(b["events"][0].details)
        assert b["events"][0].details["idempotency_key"] == "one-2"
        assert s.scalar(sa.select(sa.func.count()).select_from(AuditPending)) == 0
        assert audit.verify(s).ok


def test_a_stored_key_is_replayed_and_a_reused_one_refused_writing_nothing(
    app, lookups, users, fhir_connection, sessions
):
    client = app.test_client()
    original = _post(client, users["svc_token"], 1, key="k")
    again = _post(client, users["svc_token"], 1, key="k")
    reused = _post(client, users["svc_token"], 2, key="k")
    assert original.status_code == again.status_code == 202
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json == original.json
    assert reused.status_code == 422 and reused.json["error"]["code"] == "idempotency_key_reused"
    _drain(app)
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Message)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Attempt)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(OutboxEntry)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(PayloadVersion)) == 1
        assert s.scalar(sa.select(sa.func.count()).where(AuditEvent.action == "message.receive")) == 1


def test_settings_changed_after_the_lookup_are_obeyed_at_once(app, lookups, users, fhir_connection, sessions):
    client = app.test_client()
    assert _post(client, users["svc_token"], 1).json["status"] == "queued"
    with transaction(sessions) as s:  # as another process would change it
        s.execute(sa.update(Connection).values(enabled_message_types=["Patient"]))
    refused = _post(client, users["svc_token"], 2)
    assert refused.status_code == 202 and refused.json["status"] == "exception"
    assert refused.json["category"] == "config"
    with transaction(sessions) as s:
        s.execute(sa.update(Connection).values(enabled_message_types=[]))
    assert _post(client, users["svc_token"], 3).json["status"] == "queued"
    assert _post(client, users["svc_token"], 4).json["status"] == "queued"
    # 1 (first), 2 (settings changed: nothing written, then refused), 3 (new settings read), not 4
    assert lookups == ["one-1", "one-2", "one-3"]


def test_the_connections_runtime_state_does_not_send_requests_back_to_the_lookup(
    app, lookups, users, fhir_connection, sessions
):
    client = app.test_client()
    assert _post(client, users["svc_token"], 1).status_code == 202
    with transaction(sessions) as s:  # the breaker opens, a maintenance window starts
        s.execute(
            sa.update(Connection).values(
                consecutive_failures=5,
                circuit_open_until=sa.func.now() + sa.text("interval '1 minute'"),
                paused_at=sa.func.now(),
                paused_reason="maintenance",
                paused_by="adam",
            )
        )
    assert _post(client, users["svc_token"], 2).json["status"] == "queued"  # held later, by delivery
    assert lookups == ["one-1"]


def test_requests_racing_with_one_key_store_one_message(app, users, fhir_connection, sessions):
    client = app.test_client()
    assert _post(client, users["svc_token"], 0).status_code == 202  # the connection is known
    answers = []
    start = threading.Barrier(8)

    def post():
        c = app.test_client()
        start.wait()
        answers.append(_post(c, users["svc_token"], 7, key="raced"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in answers) == [202] * 8
    assert len({r.json["id"] for r in answers}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == 7
    _drain(app)
    with transaction(sessions, read_only=True) as s:
        raced = s.scalars(sa.select(Message).where(Message.idempotency_key == "raced")).all()
        assert len(raced) == 1
        assert len(_rows(s, raced[0].id)["attempts"]) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(OutboxEntry)) == 2
