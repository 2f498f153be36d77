"""Issue 6 'Faults': ordering per patient on sequence-sensitive connections, maintenance windows
(pause / resume), and the pinned FHIR version checked again — against the real simulator."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from app.adapters.queue import Housekeeping
from app.db.models import Attempt, AuditEvent, Connection, ExceptionItem, Message
from app.db.session import transaction
from app.services import connections, delivery, ordering
from app.services.clock import utcnow
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import message_body
from tests.samples_fhir import medication_request

PATIENT = {"reference": "Patient/pat-7001"}


def _submit(client, users, conn: str, key: str, n: int, subject: dict = PATIENT) -> str:
    r = client.post(
        "/api/v1/messages",
        json=message_body(conn, medication_request(n, subject=subject)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json["id"]


def _applied(sim_control, tenant: str, client_name: str, keys: list[str]) -> list[int]:
    got = sim_control.deliveries(tenant, "applied")
    return [got.get(f"urn:recon:idempotency:{client_name}|{key}", 0) for key in keys]


def _exception(sessions, message_id: str) -> ExceptionItem:
    with transaction(sessions, read_only=True) as s:
        return s.scalar(
            sa.select(ExceptionItem)
            .where(ExceptionItem.message_id == message_id)
            .order_by(ExceptionItem.id.desc())
        )


def _delivered_order(sessions, message_ids: list[str]) -> list[str]:
    """The messages in the order their delivering attempt finished."""
    with transaction(sessions, read_only=True) as s:
        rows = s.execute(
            sa.select(Attempt.message_id, Attempt.finished_at)
            .where(Attempt.message_id.in_(message_ids), Attempt.outcome == "delivered")
            .order_by(Attempt.finished_at, Attempt.id)
        ).all()
    return [m for m, _ in rows]


def _pause_events(sessions, conn_id: int) -> list[tuple]:
    """The connection's audited events after its creation: (action, actor, reason)."""
    with transaction(sessions, read_only=True) as s:
        events = s.execute(
            sa.select(AuditEvent.action, AuditEvent.actor, AuditEvent.reason)
            .where(AuditEvent.action.like("connection.%"), AuditEvent.subject_id == str(conn_id))
            .order_by(AuditEvent.id)
        ).all()
    return [tuple(e) for e in events if e[0] != "connection.create"]


def _ordered_trio(client, users, sessions, sim_connection, sim_control, run_worker):
    """A sequence-sensitive connection; A rejected (waits for a human), then B and C for the same
    patient and D for another patient."""
    tenant = sim_connection(
        "adt-seq",
        customer="Seq Health",
        sequence_sensitive=True,
        max_auto_retries=0,
        retry_backoff_seconds=0.0,
    )
    sim_control.set_profile(tenant, rate_reject=1.0)
    a = _submit(client, users, "adt-seq", "seq-a", 0)
    run_worker()
    assert _exception(sessions, a).state == "open"
    sim_control.set_profile(tenant, rate_reject=0.0)
    b = _submit(client, users, "adt-seq", "seq-b", 1)
    c = _submit(client, users, "adt-seq", "seq-c", 2)
    _submit(client, users, "adt-seq", "seq-d", 3, subject={"reference": "Patient/pat-9999"})
    run_worker()
    svc = users["svc"].username
    # D (another patient) went; B waits behind A, C behind B; nothing of theirs reached the EHR
    assert _applied(sim_control, tenant, svc, ["seq-a", "seq-b", "seq-c", "seq-d"]) == [0, 0, 0, 1]
    with transaction(sessions, read_only=True) as s:
        held_b, held_c = ordering.held_attempts(s, b), ordering.held_attempts(s, c)
        statuses = [s.get(Message, m).status for m in (b, c)]
    exc_a = _exception(sessions, a).id
    assert [(behind, reason.split(" (")[0]) for _, behind, reason in held_b] == [
        (a, f"held: waiting behind #{exc_a}")
    ]
    assert [behind for _, behind, _ in held_c] == [b]
    assert statuses == ["queued", "queued"]  # not failures: no exception opened for them
    assert _exception(sessions, b) is None and _exception(sessions, c) is None
    return tenant, svc, a, b, c


def test_an_ordered_pair_is_delivered_in_order_after_the_blocker_resolves(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant, svc, a, b, c = _ordered_trio(client, users, sessions, sim_connection, sim_control, run_worker)
    item = _exception(sessions, a)
    with transaction(sessions) as s:
        decide(s, item.id, users["rita"], DecisionInput("resubmit", reason="EHR fixed the formulary"))
    with transaction(sessions) as s:
        decide(s, item.id, users["leo"], DecisionInput("approve", reason="ok", password=PASSWORD))
    run_worker()
    assert _exception(sessions, a).state == "resolved"
    assert _applied(sim_control, tenant, svc, ["seq-a", "seq-b", "seq-c"]) == [1, 1, 1]
    assert _delivered_order(sessions, [a, b, c]) == [a, b, c]
    with transaction(sessions, read_only=True) as s:
        released = s.scalars(
            sa.select(AuditEvent.subject_id)
            .where(AuditEvent.action == "message.released")
            .order_by(AuditEvent.id)
        ).all()
    assert released == [b, c]


def test_an_ordered_pair_is_released_in_order_when_the_blocker_is_discarded(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant, svc, a, b, c = _ordered_trio(client, users, sessions, sim_connection, sim_control, run_worker)
    with transaction(sessions) as s:
        decide(
            s,
            _exception(sessions, a).id,
            users["rita"],
            DecisionInput("discard", reason="superseded by the next order", reason_code="superseded"),
        )
    run_worker()
    assert _applied(sim_control, tenant, svc, ["seq-a", "seq-b", "seq-c"]) == [0, 1, 1]
    assert _delivered_order(sessions, [a, b, c]) == [b, c]


def test_without_sequence_sensitivity_a_later_message_does_not_wait(
    client, users, sessions, sim_connection, sim_control, run_worker
):
    tenant = sim_connection("adt-free", customer="Free Health", max_auto_retries=0)
    sim_control.set_profile(tenant, rate_reject=1.0)
    _submit(client, users, "adt-free", "free-a", 0)
    run_worker()
    sim_control.set_profile(tenant, rate_reject=0.0)
    _submit(client, users, "adt-free", "free-b", 1)
    run_worker()
    assert _applied(sim_control, tenant, users["svc"].username, ["free-a", "free-b"]) == [0, 1]


def test_pause_holds_everything_and_resume_drains_in_order_audited(
    client, users, sessions, sim_connection, sim_control, run_worker, make_tokens
):
    tenant = sim_connection(
        "maint-fhir", customer="Maint Health", retry_backoff_seconds=0.0, max_auto_retries=1
    )
    with transaction(sessions) as s:
        conn_id = connections.by_name(s, "maint-fhir").id
    admin = make_tokens("adam")["adam"]
    r = client.post(
        f"/api/v1/connections/{conn_id}/pause",
        json={"reason": "EHR upgrade window"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 200 and r.json["paused"]["reason"] == "EHR upgrade window", r.get_data(
        as_text=True
    )
    keys = [f"maint-{n}" for n in range(4)]
    ids = [
        _submit(client, users, "maint-fhir", key, n, subject={"reference": f"Patient/p-{n}"})
        for n, key in enumerate(keys)
    ]
    for _ in range(3):  # held again and again: never sent, no retry spent
        run_worker()
    svc = users["svc"].username
    assert _applied(sim_control, tenant, svc, keys) == [0, 0, 0, 0]
    assert sim_control.requests(tenant)["total"] == 0
    with transaction(sessions, read_only=True) as s:
        items = [s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == m)) for m in ids]
    assert [(i.state, i.retry_count) for i in items] == [("retrying", 0)] * 4
    assert all("paused for maintenance" in i.detail for i in items)

    r = client.post(
        f"/api/v1/connections/{conn_id}/resume",
        json={"reason": "done"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 200 and r.json["paused"] is None and r.json["released"] == 4
    run_worker()
    assert _applied(sim_control, tenant, svc, keys) == [1, 1, 1, 1]
    assert _delivered_order(sessions, ids) == ids
    assert _pause_events(sessions, conn_id) == [
        ("connection.paused", "adam", "EHR upgrade window"),
        ("connection.resumed", "adam", "done"),
    ]
    r = client.post(
        f"/api/v1/connections/{conn_id}/resume", json={}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert r.status_code == 409  # not paused


def test_a_window_that_reaches_its_end_is_resumed_by_the_system_audited_once(
    client, users, sessions, sim_connection, sim_control, run_worker, make_tokens, runtime, queue
):
    tenant = sim_connection("window-fhir", customer="Window Health", retry_backoff_seconds=0.0)
    with transaction(sessions) as s:
        conn_id = connections.by_name(s, "window-fhir").id
    admin = make_tokens("adam")["adam"]
    until = (utcnow() + timedelta(hours=1)).isoformat() + "Z"
    r = client.post(
        f"/api/v1/connections/{conn_id}/pause",
        json={"reason": "EHR upgrade window", "until": until},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 200 and r.json["paused"]["until"], r.get_data(as_text=True)
    keys = ["window-0", "window-1"]
    ids = [
        _submit(client, users, "window-fhir", key, n, {"reference": f"Patient/w-{n}"})
        for n, key in enumerate(keys)
    ]
    run_worker()
    svc = users["svc"].username
    assert _applied(sim_control, tenant, svc, keys) == [0, 0]  # held until the window's end
    with transaction(sessions) as s:  # the hour passes
        s.execute(
            sa.update(Connection)
            .where(Connection.id == conn_id)
            .values(paused_until=utcnow() - timedelta(seconds=1))
        )
    for _ in range(2):  # two passes (or two workers): the window ends once
        Housekeeping(runtime, queue, shared=False).run_once()
    run_worker()
    assert _applied(sim_control, tenant, svc, keys) == [1, 1]
    assert _delivered_order(sessions, ids) == ids
    with transaction(sessions, read_only=True) as s:
        conn = s.get(Connection, conn_id)
        assert (conn.paused_at, conn.paused_until, conn.paused_reason) == (None, None, None)
    assert _pause_events(sessions, conn_id) == [
        ("connection.paused", "adam", "EHR upgrade window"),
        ("connection.resumed", connections.SYSTEM_ACTOR, connections.WINDOW_ENDED),
    ]


def test_pinned_version_is_checked_again_on_the_schedule(
    client, users, sessions, sim_connection, sim_control, run_worker, runtime, queue
):
    tenant = sim_connection("pinned-fhir", customer="Pinned Health")
    first = _submit(client, users, "pinned-fhir", "pin-1", 0)
    run_worker()  # the worker's adapter checks 4.0.1 once and keeps it
    # The EHR is switched to 4.3.0 mid-run; the shared housekeeping's version step notices.
    sim_control.set_profile(tenant, fhir_version="4.3.0")
    with transaction(sessions) as s:
        s.execute(
            sa.update(Connection).where(Connection.name == "pinned-fhir").values(version_checked_at=None)
        )
    Housekeeping(runtime, queue, shared=True).run_once()
    second = _submit(client, users, "pinned-fhir", "pin-2", 1)
    run_worker()
    svc = users["svc"].username
    assert _applied(sim_control, tenant, svc, ["pin-1", "pin-2"]) == [1, 0]
    assert sim_control.requests(tenant)["by_identifier"].get(f"urn:recon:idempotency:{svc}|pin-2") is None
    item = _exception(sessions, second)
    assert item.category == "config" and "4.3.0" in item.detail
    assert _exception(sessions, first) is None
    # back on the pinned version: the next check clears it
    sim_control.set_profile(tenant, fhir_version="4.0.1")
    assert delivery.check_pinned_versions(runtime, force=True) == 1
    with transaction(sessions, read_only=True) as s:
        conn = connections.by_name(s, "pinned-fhir")
        actions = s.scalars(
            sa.select(AuditEvent.action)
            .where(AuditEvent.action.like("connection.version_%"))
            .order_by(AuditEvent.id)
        ).all()
    assert conn.version_mismatch is None
    assert actions == ["connection.version_mismatch", "connection.version_ok"]


def test_the_cli_marks_ordering_and_pauses_and_resumes_a_connection(monkeypatch, database_url, sessions):
    from click.testing import CliRunner

    from app.cli import main

    monkeypatch.setenv("DATABASE_URL", database_url)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    assert run("customers", "add", "Cli Health").exit_code == 0
    add = ("connections", "add", "cli-fhir", "--customer", "Cli Health", "--protocol", "fhir-r4")
    assert run(*add, "--endpoint", "https://ehr.example/fhir", "--sequence-sensitive").exit_code == 0
    r = run("connections", "pause", "cli-fhir", "--reason", "vendor upgrade", "--until", "2999-01-01T06:00Z")
    assert r.exit_code == 0 and "paused cli-fhir until 2999-01-01 06:00 UTC" in r.output
    with transaction(sessions, read_only=True) as s:
        conn = connections.by_name(s, "cli-fhir")
        assert conn.sequence_sensitive and connections.pause_state(conn)["reason"] == "vendor upgrade"
    assert run("connections", "pause", "cli-fhir", "--reason", " ").exit_code == 2  # a reason is required
    r = run("connections", "resume", "cli-fhir")
    assert r.exit_code == 0 and "0 held item(s) released" in r.output
    assert run("connections", "resume", "cli-fhir").exit_code == 2  # not paused
    assert run("connections", "update", "cli-fhir", "--no-sequence-sensitive").exit_code == 0
    with transaction(sessions, read_only=True) as s:
        conn = connections.by_name(s, "cli-fhir")
        assert not conn.sequence_sensitive and connections.pause_state(conn) is None
        actions = s.scalars(
            sa.select(AuditEvent.action)
            .where(AuditEvent.subject_type == "connection", AuditEvent.subject_id == str(conn.id))
            .order_by(AuditEvent.id)
        ).all()
    assert actions == ["connection.create", "connection.paused", "connection.resumed", "connection.update"]
