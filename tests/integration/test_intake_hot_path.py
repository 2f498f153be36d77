"""Intake's hot path (issue 6): audit events sealed by the process's background sealer, and
service tokens checked against the database at most once per RECON_TOKEN_CACHE_SECONDS —
with revocation in the same process at once, and people's tokens on every request."""

import time

import pytest
import sqlalchemy as sa

from app.db.models import ApiToken, AuditEvent, AuditPending, Message
from app.db.session import transaction
from app.services import admin, audit, sealer
from app.services.users import create_personal_token
from tests.samples import medication_request, message_body


def _app(database_url, redis_url, **config):
    from app import create_app

    settings = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True}
    settings.setdefault("RECON_SEAL_MODE", config.pop("RECON_SEAL_MODE", "inline"))
    return create_app({**settings, **config})


def _post(client, token, n, key_prefix="hp"):
    return client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", medication_request(n)),
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"{key_prefix}-{n}"},
    )


def test_background_sealer_seals_every_intake_event_into_one_verifiable_chain(
    database_url, redis_url, users, fhir_connection, sessions
):
    app = _app(database_url, redis_url, RECON_SEAL_MODE="background")
    client = app.test_client()
    for n in range(40):
        assert _post(client, users["svc_token"], n).status_code == 202
    assert sealer.for_factory(app.extensions["recon_sessions"]).drain(timeout=20)
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(AuditPending)) == 0
        received = s.scalars(
            sa.select(AuditEvent.subject_id).where(AuditEvent.action == "message.receive")
        ).all()
        messages = s.scalars(sa.select(Message.id)).all()
        assert sorted(received) == sorted(messages) and len(messages) == 40
        assert audit.verify(s).ok


def test_inline_mode_seals_before_the_response(database_url, redis_url, users, fhir_connection, sessions):
    client = _app(database_url, redis_url, RECON_SEAL_MODE="inline").test_client()
    assert _post(client, users["svc_token"], 1).status_code == 202
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(AuditPending)) == 0
        assert s.scalar(sa.select(sa.func.count()).where(AuditEvent.action == "message.receive")) == 1


def test_a_service_token_revoked_in_this_process_is_refused_at_once(
    database_url, redis_url, users, fhir_connection, sessions
):
    client = _app(database_url, redis_url, RECON_TOKEN_CACHE_SECONDS=60).test_client()
    assert _post(client, users["svc_token"], 1).status_code == 202  # now cached
    with transaction(sessions) as s:
        token_id = s.scalar(sa.select(ApiToken.id).where(ApiToken.user_id == users["svc"].id))
        admin.revoke_token(s, token_id, actor="adam", reason="leaked")
    r = _post(client, users["svc_token"], 2)
    assert r.status_code == 401
    assert r.json["error"]["code"] == "unauthorized"


def test_a_service_account_deactivated_in_this_process_is_refused_at_once(
    database_url, redis_url, users, fhir_connection, sessions
):
    client = _app(database_url, redis_url, RECON_TOKEN_CACHE_SECONDS=60).test_client()
    assert _post(client, users["svc_token"], 1).status_code == 202
    with transaction(sessions) as s:
        admin.set_user_active(s, users["svc"].id, False, actor=s.get(type(users["adam"]), users["adam"].id))
    assert _post(client, users["svc_token"], 2).status_code == 401


def test_a_revocation_made_elsewhere_takes_effect_within_the_cache_time(
    database_url, redis_url, users, fhir_connection, sessions
):
    client = _app(database_url, redis_url, RECON_TOKEN_CACHE_SECONDS=0.5).test_client()
    assert _post(client, users["svc_token"], 1).status_code == 202
    # Another process revokes it: a plain UPDATE, nothing this process hears about.
    with transaction(sessions) as s:
        s.execute(
            sa.update(ApiToken).where(ApiToken.user_id == users["svc"].id).values(revoked_at=sa.func.now())
        )
    assert _post(client, users["svc_token"], 2).status_code == 202  # within the stated window
    time.sleep(0.6)
    assert _post(client, users["svc_token"], 3).status_code == 401


def test_a_persons_token_is_checked_on_every_request(database_url, redis_url, users, sessions):
    client = _app(database_url, redis_url, RECON_TOKEN_CACHE_SECONDS=60).test_client()
    with transaction(sessions) as s:
        token = create_personal_token(s, s.get(type(users["rita"]), users["rita"].id))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/exceptions", headers=headers).status_code == 200
    with transaction(sessions) as s:
        s.execute(
            sa.update(ApiToken).where(ApiToken.user_id == users["rita"].id).values(revoked_at=sa.func.now())
        )
    assert client.get("/api/v1/exceptions", headers=headers).status_code == 401


def test_api_requests_neither_read_nor_set_the_console_cookie(
    database_url, redis_url, users, fhir_connection
):
    client = _app(database_url, redis_url).test_client()
    r = _post(client, users["svc_token"], 1)
    assert r.status_code == 202
    assert "Set-Cookie" not in r.headers


@pytest.mark.postgres
def test_background_sealer_retries_while_another_process_holds_the_sealer_lock(
    database_url, redis_url, users, fhir_connection, sessions
):
    """Another process's sealer holds the lock (here: for 0.5 s, sealing nothing): the hand-off
    is not lost — the thread tries again until its batch goes through."""
    from app.db.session import get_engine

    app = _app(database_url, redis_url, RECON_SEAL_MODE="background")
    client = app.test_client()
    holder = get_engine(database_url).connect()
    holder.begin()
    assert holder.execute(sa.select(sa.func.pg_try_advisory_xact_lock(audit.SEALER_LOCK_KEY))).scalar()
    try:
        for n in range(5):
            assert _post(client, users["svc_token"], n).status_code == 202
        time.sleep(0.5)
        with transaction(sessions, read_only=True) as s:
            assert s.scalar(sa.select(sa.func.count()).select_from(AuditPending)) == 5  # held off
    finally:
        holder.rollback()
        holder.close()
    assert sealer.for_factory(app.extensions["recon_sessions"]).drain(timeout=20)
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(AuditPending)) == 0
        assert audit.verify(s).ok


def test_an_event_recorded_before_an_intake_in_one_transaction_comes_first_in_the_chain(
    users, fhir_connection, sessions
):
    """A batch import records events and accepts messages in one transaction: the chain keeps
    the order they were recorded in (intake's statements run beside the ORM, not through it)."""
    from app.db.models import User
    from app.services.intake import submit_message

    with transaction(sessions) as s:
        svc = s.get(User, users["svc"].id)
        audit.record(s, actor="svc", action="batch.start", subject_type="batch", subject_id="b1")
        submit_message(s, svc, "order-1", message_body("mercy-epic", medication_request(1)))
        audit.record(s, actor="svc", action="batch.end", subject_type="batch", subject_id="b1")
    with transaction(sessions, read_only=True) as s:
        actions = s.scalars(sa.select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert [a for a in actions if a in ("batch.start", "message.receive", "batch.end")] == [
        "batch.start",
        "message.receive",
        "batch.end",
    ]


def test_api_requests_skip_the_login_limiters_hooks_and_logins_still_pass_through_them(
    database_url, redis_url, users, fhir_connection, monkeypatch
):
    # Only the login view has limits; the limiter's per-request hooks cost an intake request
    # CPU for nothing, so API requests skip them (app/web/security.py).
    app = _app(database_url, redis_url)
    (limiter,) = app.extensions["limiter"]
    calls = []
    original = limiter._check_request_limit
    monkeypatch.setattr(limiter, "_check_request_limit", lambda *a, **k: calls.append(1) or original(*a, **k))
    client = app.test_client()
    assert _post(client, users["svc_token"], 1, key_prefix="limiter").status_code == 202
    assert calls == []
    assert client.get("/login").status_code == 200
    assert calls  # its before-request hook (and the view's own limits, for a POST)
