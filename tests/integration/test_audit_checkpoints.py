"""Issue 7, anchored audit chain: checkpoints of the chain head (count, last id, hash, time) go to
the JSON log stream, an append-only file and every export; `recon audit verify --checkpoints`
fails, naming the checkpoint, when the chain no longer reaches a recorded head — an edited
chain recomputed end to end, or a truncated and restarted one, both of which plain verify
calls OK. Both databases."""

from __future__ import annotations

import json
import logging
import re

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from app.cli import main
from app.db.models import AuditEvent
from app.db.session import get_engine, transaction
from app.domain.audit_chain import EVENT_FIELDS, GENESIS_HASH, chain_hash
from app.services import audit

BROKEN = re.compile(
    r"^BROKEN at checkpoint (\S+) \(event (\d+)\): the chain no longer reaches the recorded head$", re.M
)


@pytest.fixture
def cli(monkeypatch, database_url, tmp_path):
    file = tmp_path / "anchors" / "audit-checkpoints.jsonl"
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("RECON_AUDIT_CHECKPOINT_FILE", str(file))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    invoke.file = file
    return invoke


def _record(sessions, n: int, tag: str = "e") -> None:
    with transaction(sessions) as s:
        for i in range(n):
            audit.record(s, actor="rita", action=f"test.{tag}", subject_type="exception", subject_id=str(i))


def _unguarded(engine):
    """As the owner: switch the append-only triggers off for one transaction's work."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
                conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
                yield conn
            else:
                conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
                yield conn
                conn.exec_driver_sql("ALTER TABLE audit_events ENABLE TRIGGER USER")

    return cm()


def _edit_and_recompute(sessions, event_id: int) -> None:
    """Rewrite one event, then recompute every hash from there and the head: a chain that
    plain verification cannot tell from the real one."""
    engine = sessions.kw["bind"]
    with _unguarded(engine) as conn:
        conn.execute(
            sa.update(AuditEvent.__table__).where(AuditEvent.id == event_id).values(reason="rewritten")
        )
        with so_session(conn) as s:
            events = s.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
            prev = GENESIS_HASH
            for event in events:
                new = chain_hash(prev, {name: getattr(event, name) for name in EVENT_FIELDS})
                conn.execute(
                    sa.update(AuditEvent.__table__)
                    .where(AuditEvent.id == event.id)
                    .values(prev_hash=prev, hash=new)
                )
                prev = new
        conn.exec_driver_sql(
            f"UPDATE audit_head SET last_id = {events[-1].id}, last_hash = '{prev}' WHERE id = 1"
        )


def so_session(conn):
    import sqlalchemy.orm as so

    return so.Session(bind=conn)


def _truncate(sessions) -> None:
    engine = sessions.kw["bind"]
    with _unguarded(engine) as conn:
        conn.exec_driver_sql(
            "DELETE FROM audit_events" if engine.dialect.name == "sqlite" else "TRUNCATE audit_events"
        )
        conn.exec_driver_sql(f"UPDATE audit_head SET last_id = 0, last_hash = '{GENESIS_HASH}' WHERE id = 1")


def _lines(file) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()]


def test_a_checkpoint_goes_to_the_file_and_the_log_stream(cli, sessions):
    _record(sessions, 3)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    logging.getLogger("recon.audit.checkpoint").addHandler(handler)
    try:
        r = cli("audit", "checkpoint")
    finally:
        logging.getLogger("recon.audit.checkpoint").removeHandler(handler)
    assert r.exit_code == 0, r.output
    with transaction(sessions, read_only=True) as s:
        head = audit.head(s)
    [line] = _lines(cli.file)
    assert line["last_id"] == head.last_id == line["count"] == 3
    assert line["hash"] == head.last_hash
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line["at"])
    assert [rec.audit_checkpoint for rec in seen] == [line]
    # Appended, never rewritten.
    _record(sessions, 2)
    assert cli("audit", "checkpoint").exit_code == 0
    assert [x["last_id"] for x in _lines(cli.file)] == [3, 5]


def test_a_healthy_chain_passes_its_checkpoints(cli, sessions):
    _record(sessions, 4)
    assert cli("audit", "checkpoint").exit_code == 0
    _record(sessions, 3)
    assert cli("audit", "checkpoint").exit_code == 0
    _record(sessions, 2)
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 0, r.output
    with transaction(sessions, read_only=True) as s:
        head = audit.head(s)
    assert r.output == f"OK {head.last_id} events head {head.last_hash}\n"


def test_an_edited_and_recomputed_chain_verifies_alone_but_not_against_its_checkpoints(cli, sessions):
    _record(sessions, 5)
    assert cli("audit", "checkpoint").exit_code == 0
    [first] = _lines(cli.file)
    _record(sessions, 3)
    _edit_and_recompute(sessions, 2)
    plain = cli("audit", "verify")
    assert plain.exit_code == 0 and plain.output.startswith("OK 8 events head ")
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 1
    assert BROKEN.search(r.output).groups() == (first["at"], str(first["last_id"]))
    assert r.output.strip() == (
        f"BROKEN at checkpoint {first['at']} (event 5): the chain no longer reaches the recorded head"
    )


def test_an_edit_after_the_last_checkpoint_is_not_reported_by_the_checkpoints(cli, sessions):
    """What checkpoints cannot see: an edit after the newest one (so write them often)."""
    _record(sessions, 3)
    assert cli("audit", "checkpoint").exit_code == 0
    _record(sessions, 3)
    _edit_and_recompute(sessions, 5)
    assert cli("audit", "verify", "--checkpoints", str(cli.file)).exit_code == 0


def test_a_truncated_chain_fails_its_checkpoints(cli, sessions):
    _record(sessions, 4)
    assert cli("audit", "checkpoint").exit_code == 0
    _truncate(sessions)
    assert cli("audit", "verify").output.startswith("OK 0 events")
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 1 and BROKEN.search(r.output).group(2) == "4", r.output


def test_a_truncated_and_restarted_chain_fails_its_checkpoints(cli, sessions):
    _record(sessions, 3)
    assert cli("audit", "checkpoint").exit_code == 0
    _truncate(sessions)
    _record(sessions, 6, "again")  # longer than before: id 3 exists again, with another hash
    plain = cli("audit", "verify")
    assert plain.exit_code == 0 and plain.output.startswith("OK 6 events")
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 1 and BROKEN.search(r.output).group(2) == "3", r.output


def test_the_first_checkpoint_not_reached_is_named(cli, sessions):
    _record(sessions, 2)
    assert cli("audit", "checkpoint").exit_code == 0
    _record(sessions, 2)
    assert cli("audit", "checkpoint").exit_code == 0
    first, second = _lines(cli.file)
    _edit_and_recompute(sessions, 3)  # after the first checkpoint, before the second
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 1
    assert BROKEN.search(r.output).group(2) == str(second["last_id"]) == "4"


def test_a_broken_chain_still_names_the_event(cli, sessions):
    """verify's own contract first: a plain edit (not recomputed) names the broken event."""
    _record(sessions, 3)
    assert cli("audit", "checkpoint").exit_code == 0
    with _unguarded(sessions.kw["bind"]) as conn:
        conn.exec_driver_sql("UPDATE audit_events SET reason = 'x' WHERE id = 2")
    r = cli("audit", "verify", "--checkpoints", str(cli.file))
    assert r.exit_code == 1 and r.output.startswith("BROKEN at event 2: ")


def test_a_jsonl_exports_trailer_is_a_checkpoint(cli, sessions, tmp_path):
    _record(sessions, 3)
    out = tmp_path / "export.jsonl"
    assert cli("audit", "export", "--format", "jsonl", "--out", str(out)).exit_code == 0
    trailer = out.read_text().splitlines()[-1]
    assert json.loads(trailer)["chain_head"]["id"] == 4  # the export's own event included
    anchors = tmp_path / "from-export.jsonl"
    anchors.write_text(trailer + "\n")
    assert cli("audit", "verify", "--checkpoints", str(anchors)).exit_code == 0
    _edit_and_recompute(sessions, 1)
    r = cli("audit", "verify", "--checkpoints", str(anchors))
    assert r.exit_code == 1 and "BROKEN at checkpoint export line 1 (event 4)" in r.output


def test_a_file_that_is_not_checkpoints_is_refused(cli, sessions, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"at": "2026-12-02T10:00:00Z", "count": 1, "last_id": 1, "hash": "ab"}\nnot json\n')
    r = cli("audit", "verify", "--checkpoints", str(bad))
    assert r.exit_code == 1 and "bad.jsonl:2: not a checkpoint line" in r.output


def test_a_rewritten_head_is_not_anchored(cli, sessions):
    _record(sessions, 2)
    with get_engine(str(sessions.kw["bind"].url.render_as_string(hide_password=False))).begin() as conn:
        conn.exec_driver_sql(f"UPDATE audit_head SET last_hash = '{'0' * 64}' WHERE id = 1")
    r = cli("audit", "checkpoint")
    assert r.exit_code == 1 and "not anchoring it" in r.output
    assert not cli.file.exists()


def test_housekeeping_writes_checkpoints_on_its_schedule(sessions, queue, tmp_path, monkeypatch):
    from app.adapters.queue import Housekeeping
    from app.services.delivery import Runtime

    file = tmp_path / "hk.jsonl"
    monkeypatch.setenv("RECON_AUDIT_CHECKPOINT_FILE", str(file))
    monkeypatch.setenv("RECON_AUDIT_CHECKPOINT_SECONDS", "3600")
    _record(sessions, 2)
    a = Housekeeping(Runtime(sessions=sessions, worker_name="a"), queue)
    b = Housekeeping(Runtime(sessions=sessions, worker_name="b"), queue)
    a.run_once()
    b.run_once()  # one holder per interval: b's pass writes none
    _record(sessions, 1)
    a.run_once()
    [line] = _lines(file)
    assert line["last_id"] == 2
    monkeypatch.setenv("RECON_AUDIT_CHECKPOINT_SECONDS", "0")
    c = Housekeeping(Runtime(sessions=sessions, worker_name="c"), queue)
    c.run_once()
    assert [x["last_id"] for x in _lines(file)] == [2, 3]
