"""SPEC 6: append-only at the database level, hash chain verification, exports."""

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from app.cli import main
from app.db.models import AuditEvent
from app.db.session import get_engine, transaction
from app.services import audit
from app.services.connections import add_customer


@pytest.fixture
def events(sessions):
    with transaction(sessions) as s:
        for name in ("Alpha Clinic", "Beta Hospital", "Gamma Health"):
            add_customer(s, name, actor="adam")
    return sessions


@pytest.fixture
def cli_env(monkeypatch, database_url):
    monkeypatch.setenv("DATABASE_URL", database_url)
    return CliRunner()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET reason = 'edited' WHERE id = 2",
        "DELETE FROM audit_events WHERE id = 2",
    ],
)
def test_update_and_delete_fail_at_the_database_level(events, database_url, statement):
    engine = get_engine(database_url)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql(statement)
    with transaction(events) as s:
        assert s.get(AuditEvent, 2).reason is None and audit.verify(s).ok


def test_truncate_fails(events, database_url, is_postgres):
    # SQLite has no TRUNCATE: its equivalent is an unqualified DELETE (the "truncate optimization",
    # which SQLite turns off when the table has triggers).
    statement = "TRUNCATE audit_events" if is_postgres else "DELETE FROM audit_events"
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), get_engine(database_url).begin() as conn:
        conn.exec_driver_sql(statement)
    with transaction(events) as s:
        assert audit.verify(s).count == 3


def _tamper(database_url: str, event_id: int) -> None:
    """Alter a row behind the triggers' back, as a DBA with full rights could."""
    engine = get_engine(database_url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            conn.exec_driver_sql(
                f"UPDATE audit_events SET reason = 'rewritten history' WHERE id = {event_id}"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE rejected'); END"
            )
        else:
            conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete")
            conn.exec_driver_sql(
                f"UPDATE audit_events SET reason = 'rewritten history' WHERE id = {event_id}"
            )
            conn.exec_driver_sql("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update_delete")


def test_verify_passes_on_an_intact_chain(events, cli_env):
    result = cli_env.invoke(main, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK 3 events head ")


def test_altered_row_makes_verify_fail_and_name_the_event(events, database_url, cli_env):
    _tamper(database_url, 2)
    result = cli_env.invoke(main, ["audit", "verify"])
    assert result.exit_code != 0
    assert "event 2" in result.output


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "fhir-ndjson"])
def test_exports_are_audited_and_end_with_the_chain_head(events, cli_env, tmp_path, fmt):
    out = tmp_path / f"export.{fmt}"
    result = cli_env.invoke(main, ["audit", "export", "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    with transaction(events) as s:
        head = audit.head(s)
        last = s.get(AuditEvent, head.last_id)
        assert last.action == "audit.export" and last.details["format"] == fmt
    if fmt == "csv":
        assert lines[0].startswith("id,occurred_at,actor,action")
        assert lines[-1] == f"# chain_head id={head.last_id} hash={head.last_hash}"
        assert len(lines) == 1 + 4 + 1
    elif fmt == "jsonl":
        rows = [json.loads(x) for x in lines]
        assert [r["actor"] for r in rows[:3]] == ["adam"] * 3
        assert rows[-1] == {"chain_head": {"id": head.last_id, "hash": head.last_hash}}
    else:
        rows = [json.loads(x) for x in lines]
        assert all(r["resourceType"] == "AuditEvent" for r in rows)
        assert rows[0]["agent"][0]["who"]["identifier"]["value"] == "adam"
        assert rows[-1]["entity"][0]["what"]["identifier"]["value"] == head.last_hash


def test_export_window(events, cli_env):
    result = cli_env.invoke(main, ["audit", "export", "--format", "jsonl", "--since", "2999-01-01T00:00:00Z"])
    rows = [json.loads(x) for x in result.output.splitlines()]
    assert len(rows) == 1 and "chain_head" in rows[0]


def test_csv_export_neutralises_formula_cells(sessions, cli_env, tmp_path):
    """Issue 7: a reason or name that a spreadsheet would run as a formula is exported as text
    (one leading quote); ids stay numbers and every other cell is as stored."""
    import csv

    with transaction(sessions) as s:
        for reason in ('=HYPERLINK("http://x","click")', "@SUM(A1:A2)", "+1", "-2", "plain"):
            audit.record(
                s,
                actor="=evil",
                action="decision.comment",
                subject_type="exception",
                subject_id=1,
                reason=reason,
            )
    out = tmp_path / "export.csv"
    result = cli_env.invoke(main, ["audit", "export", "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    comments = [r for r in rows if r["action"] == "decision.comment"]
    assert [r["reason"] for r in comments] == [
        '\'=HYPERLINK("http://x","click")',
        "'@SUM(A1:A2)",
        "'+1",
        "'-2",
        "plain",
    ]
    assert {r["actor"] for r in comments} == {"'=evil"}
    assert [int(r["id"]) for r in rows] == list(range(1, len(rows) + 1))
