"""PHI retention (issue 7): delivered messages' payloads are purged after
RECON_PAYLOAD_RETENTION_DAYS (default 90) — bytes and text gone, hash, size and purge time kept,
audited as payload.purged; unresolved items and the audit log are never purged."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from click.testing import CliRunner
from freezegun import freeze_time

from app.cli import main
from app.db.models import AuditEvent, ExceptionItem, Message, PayloadVersion
from app.db.session import transaction
from app.domain.payloads import sha256_hex
from app.services.phi import purge_payloads

T0 = datetime(2026, 1, 5, 9, 0)


def _deliver(sessions, exc_id: int, *, resolved: bool) -> str:
    """Test setup: the message of `exc_id` as the worker leaves it after a delivery."""
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        item.message.status = "delivered"
        if resolved:
            item.state = "resolved"
        else:
            s.delete(item)
        return item.message_id


def _versions(sessions, message_id: str) -> list[PayloadVersion]:
    with transaction(sessions) as s:
        return list(s.scalars(sa.select(PayloadVersion).where(PayloadVersion.message_id == message_id)))


def test_delivered_payloads_are_purged_after_the_retention_period_and_nothing_else(
    sessions, make, audit_events
):
    with freeze_time(T0):
        delivered = _deliver(sessions, make(), resolved=False)
        resolved = _deliver(sessions, make(), resolved=True)
        with transaction(sessions) as s:
            unresolved = s.get(ExceptionItem, make()).message_id  # an open exception: never purged
    with freeze_time(T0 + timedelta(days=80)):
        recent = _deliver(sessions, make(), resolved=True)
    [original] = _versions(sessions, delivered)
    size, digest = len(original.raw), original.sha256
    events_before = len(audit_events())

    with freeze_time(T0 + timedelta(days=89)):
        assert purge_payloads(sessions, days=90).messages == 0  # not old enough yet
    with freeze_time(T0 + timedelta(days=91)):
        dry = purge_payloads(sessions, days=90, dry_run=True)
        assert (dry.messages, dry.versions, dry.bytes) == (2, 2, size * 2)
        assert _versions(sessions, delivered)[0].raw == original.raw  # a dry run changes nothing
        result = purge_payloads(sessions, days=90)
    assert (result.messages, result.versions, result.bytes, result.dry_run) == (2, 2, size * 2, False)

    for message_id in (delivered, resolved):
        [version] = _versions(sessions, message_id)
        assert (version.raw, version.text, version.sha256, version.size_bytes) == (b"", None, digest, size)
        assert version.purged_at == T0 + timedelta(days=91)
        assert sha256_hex(original.raw) == version.sha256
    for message_id in (unresolved, recent):
        [version] = _versions(sessions, message_id)
        assert version.raw == original.raw and version.purged_at is None
    with transaction(sessions) as s:
        assert s.get(Message, delivered).patient_ref == "Patient/123456"  # the row stays, masked in lists

    [event] = audit_events(action="payload.purged")
    assert (event.actor, event.details["messages"], event.details["versions"], event.details["bytes"]) == (
        "system:retention",
        2,
        2,
        size * 2,
    )
    assert event.details["retention_days"] == 90
    # The audit log is never purged: every event before the purge is still there, plus its own.
    assert len(audit_events()) == events_before + 1

    with freeze_time(T0 + timedelta(days=92)):
        assert purge_payloads(sessions, days=90).messages == 0
    assert len(audit_events(action="payload.purged")) == 1


def test_a_purged_payload_shows_its_marker_and_records_no_phi_view(sessions, make, login, audit_events):
    with freeze_time(T0):
        exc_id = make()
        _deliver(sessions, exc_id, resolved=True)
    with freeze_time(T0 + timedelta(days=100)):
        assert purge_payloads(sessions, days=90).messages == 1
    page = login("lena").get(f"/exceptions/{exc_id}?payload=1").get_data(as_text=True)
    assert "data-purged" in page and "rxnorm" not in page
    assert audit_events(action="phi.view") == []


def test_the_cli_purges_with_a_dry_run_first(sessions, make, monkeypatch, database_url):
    with freeze_time(T0):
        message_id = _deliver(sessions, make(), resolved=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("RECON_PAYLOAD_RETENTION_DAYS", "30")
    runner = CliRunner()
    dry = runner.invoke(main, ["payloads", "purge", "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0 and dry.output.startswith(
        "would purge 1 payload versions of 1 delivered messages"
    )
    assert _versions(sessions, message_id)[0].purged_at is None
    done = runner.invoke(main, ["payloads", "purge"], catch_exceptions=False)
    assert done.exit_code == 0 and done.output.startswith("purged 1 payload versions of 1 delivered messages")
    assert _versions(sessions, message_id)[0].purged_at is not None
    with transaction(sessions) as s:
        actors = s.scalars(sa.select(AuditEvent.actor).where(AuditEvent.action == "payload.purged")).all()
    assert actors == ["system:cli"]
