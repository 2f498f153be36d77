"""Issue 5 'Batch files': `recon import FILE --connection C` through the same intake as the API,
against the test database and the real simulator (MLLP and FHIR)."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import sqlalchemy as sa
import sqlalchemy.orm as so
from click.testing import CliRunner

from app.cli import main
from app.db.models import AuditEvent, ExceptionItem, Message, PayloadVersion, User
from app.db.session import transaction
from app.services import batch_import, connections
from app.services.users import by_username
from tests.samples import medication_request


@pytest.fixture
def recon(monkeypatch, database_url):
    """recon(*args) -> click Result of the real `recon` command against the test database."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args])

    return invoke


@pytest.fixture
def mllp_lab(sessions, sim):
    """An hl7v2-mllp connection 'mercy-lab' to the simulator; returns a fresh tenant (= MSH-6)."""
    tenant = f"h{uuid.uuid4().hex[:10]}"
    with transaction(sessions) as s:
        connections.add_customer(s, "Mercy Labs")
        connections.add_connection(
            s,
            "mercy-lab",
            customer="Mercy Labs",
            protocol="hl7v2-mllp",
            endpoint=f"127.0.0.1:{sim.mllp_port}",
            connect_timeout=2.0,
            read_timeout=2.0,
            retry_backoff_seconds=0.0,
        )
    return tenant


def adt(tenant: str, event: str, control: str, name: bytes) -> bytes:
    return (
        f"MSH|^~\\&|RECON|MERCY|EHR|{tenant.upper()}|20261202101500||ADT^{event}|{control}|P|2.5.1\r".encode()
        + b"PID|1||MRN-"
        + control.encode()
        + b"^^^MERCY^MR||"
        + name
        + b"||19800101|F\rPV1|1|I|4W^401^A\r"
    )


def hl7_batch(tenant: str) -> tuple[bytes, list[bytes]]:
    """A two-batch file with a Latin-1 and a cp1252 name; (file bytes, its messages)."""
    messages = [
        adt(tenant, "A01", "C1", b"DOE^JANE"),
        adt(tenant, "A08", "C2", "MÜLLER^JÖRG".encode("latin-1")),
        adt(tenant, "A04", "C3", "NUÑEZ – JR^MARÍA".encode("cp1252")),
    ]
    data = (
        b"FHS|^~\\&|RECON|MERCY\rBHS|^~\\&|RECON|MERCY\r"
        + messages[0]
        + messages[1]
        + b"BTS|2\rBHS|^~\\&|RECON|MERCY\r"
        + messages[2]
        + b"BTS|1\rFTS|2\r"
    )
    return data, messages


def stored(sessions) -> list[tuple[Message, PayloadVersion, ExceptionItem | None]]:
    with transaction(sessions, read_only=True) as s:
        rows = s.scalars(
            sa.select(Message).options(so.joinedload(Message.client)).order_by(Message.idempotency_key)
        ).all()
        return [
            (
                m,
                s.get(PayloadVersion, m.current_payload_id),
                s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == m.id)),
            )
            for m in rows
        ]


def key(data: bytes, position: int) -> str:
    return f"import:{hashlib.sha256(data).hexdigest()[:16]}:{position}"


def test_an_hl7_batch_file_is_imported_once_and_delivered_over_mllp(
    tmp_path, recon, sessions, sim, sim_control, mllp_lab, run_worker
):
    data, messages = hl7_batch(mllp_lab)
    path = tmp_path / "adt-batch.hl7"
    path.write_bytes(data)

    first = recon("import", path, "--connection", "mercy-lab")
    assert first.exit_code == 0, first.output
    assert (
        "imported 3 messages from adt-batch.hl7 (HL7 v2 batch, 2 batches) to mercy-lab as importer: "
        "3 new (3 queued for delivery, 0 exceptions), 0 already imported"
    ) in first.output
    assert "warning" not in first.output
    rows = stored(sessions)
    assert [m.idempotency_key for m, _, _ in rows] == [key(data, n) for n in (1, 2, 3)]
    assert [m.message_type for m, _, _ in rows] == ["ADT^A01", "ADT^A08", "ADT^A04"]
    assert [p.raw for _, p, _ in rows] == messages  # each message's bytes exactly as in the file
    assert all(m.status == "queued" and m.client.username == "importer" for m, _, _ in rows)

    second = recon("import", path, "--connection", "mercy-lab")
    assert second.exit_code == 0, second.output
    assert "0 new, 3 already imported" in second.output
    assert len(stored(sessions)) == 3  # the same file twice: each message created once

    run_worker()
    rows = stored(sessions)
    assert [m.status for m, _, _ in rows] == ["delivered"] * 3
    applied = sim_control.http.get(f"/_sim/tenants/{mllp_lab}/hl7").json()["applied"]
    assert applied == {m.control_id: 1 for m, _, _ in rows}
    cp1252_message = rows[2][0]
    received = sim.state.peek(mllp_lab).hl7_last[cp1252_message.control_id].decode("utf-8")
    assert "NUÑEZ – JR^MARÍA" in received  # the legacy bytes arrive as the same name

    # A third import after delivery still creates nothing and sends nothing.
    assert "0 new, 3 already imported" in recon("import", path, "--connection", "mercy-lab").output
    run_worker()
    assert sim_control.http.get(f"/_sim/tenants/{mllp_lab}/hl7").json()["applied"] == applied


def test_the_importer_is_a_service_user_created_by_the_cli_and_the_import_is_audited(
    tmp_path, recon, sessions, mllp_lab
):
    data, _ = hl7_batch(mllp_lab)
    path = tmp_path / "batch.hl7"
    path.write_bytes(data)
    assert recon("import", path, "--connection", "mercy-lab").exit_code == 0
    with transaction(sessions, read_only=True) as s:
        importer = by_username(s, "importer")
        assert (importer.role, importer.password_hash) == ("service", None)
        events = s.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
    created = [e for e in events if e.action == "user.create" and e.details["username"] == "importer"]
    assert [e.actor for e in created] == ["system:cli"]
    receives = [e for e in events if e.action == "message.receive"]
    assert len(receives) == 3 and {e.actor for e in receives} == {"importer"}
    (summary,) = [e for e in events if e.action == "batch.import"]
    assert summary.actor == "system:cli"
    assert summary.details["sha256"] == hashlib.sha256(data).hexdigest()
    assert (summary.details["created"], summary.details["already_imported"]) == (3, 0)
    assert recon("audit", "verify").exit_code == 0


def test_an_ndjson_file_to_a_fhir_connection_with_a_broken_line_kept_as_data_shape(
    tmp_path, recon, sessions, fhir_connection, run_worker, sim_control
):
    good = [json.dumps(medication_request(n)).encode() for n in range(3)]
    broken = b'{"resourceType": "MedicationRequest", "status": "act\xe9'  # truncated, and Latin-1
    data = good[0] + b"\n\n" + broken + b"\r\n" + good[1] + b"\n   \n" + good[2] + b"\n"
    path = tmp_path / "orders.ndjson"
    path.write_bytes(data)

    first = recon("import", path, "--connection", "mercy-epic")
    assert first.exit_code == 0, first.output
    assert (
        "imported 4 messages from orders.ndjson (FHIR NDJSON) to mercy-epic as importer: "
        "4 new (3 queued for delivery, 1 exception: data_shape 1), 0 already imported"
    ) in first.output
    rows = stored(sessions)
    by_key = {m.idempotency_key: (m, p, x) for m, p, x in rows}
    message, payload, item = by_key[key(data, 2)]
    assert payload.raw == broken  # the broken line's bytes, kept as they were
    assert (message.status, message.message_type) == ("exception", "unknown")
    assert (item.category, item.state) == ("data_shape", "open")
    assert [by_key[key(data, n)][1].raw for n in (1, 3, 4)] == good

    second = recon("import", path, "--connection", "mercy-epic")
    assert second.exit_code == 0 and "0 new, 4 already imported" in second.output
    assert len(stored(sessions)) == 4

    run_worker()
    statuses = {m.idempotency_key: m.status for m, _, _ in stored(sessions)}
    assert [statuses[key(data, n)] for n in (1, 2, 3, 4)] == [
        "delivered",
        "exception",
        "delivered",
        "delivered",
    ]
    assert sum(sim_control.deliveries(fhir_connection.tenant, "applied").values()) == 3


def test_a_run_that_stopped_half_way_resumes_where_it_stopped(
    tmp_path, recon, sessions, mllp_lab, monkeypatch
):
    data = b"".join(adt(mllp_lab, "A08", f"R{n}", b"DOE^JOHN") for n in range(7))
    path = tmp_path / "resume.hl7"
    path.write_bytes(data)
    real_submit, calls = batch_import.submit_message, []

    def crash_on_the_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("the power went out")
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(batch_import, "submit_message", crash_on_the_sixth)
    crashed = recon("import", path, "--connection", "mercy-lab", "--batch-size", 2)
    assert crashed.exit_code != 0 and isinstance(crashed.exception, RuntimeError)
    assert len(stored(sessions)) == 4  # two committed transactions of two; the third rolled back

    monkeypatch.setattr(batch_import, "submit_message", real_submit)
    resumed = recon("import", path, "--connection", "mercy-lab", "--batch-size", 2)
    assert resumed.exit_code == 0, resumed.output
    assert "3 new (3 queued for delivery, 0 exceptions), 4 already imported" in resumed.output
    assert [m.idempotency_key for m, _, _ in stored(sessions)] == [key(data, n) for n in range(1, 8)]


def test_bts_count_mismatch_and_stray_segments_are_warnings_and_items(tmp_path, recon, sessions, mllp_lab):
    message = adt(mllp_lab, "A08", "W1", b"DOE^JANE")
    data = b"BHS|^~\\&\rZZX|not a message\r" + message + b"BTS|5\r"
    path = tmp_path / "odd.hl7"
    path.write_bytes(data)
    r = recon("import", path, "--connection", "mercy-lab")
    assert r.exit_code == 0, r.output
    assert "2 new (1 queued for delivery, 1 exception: data_shape 1)" in r.output
    assert "warning: batch 1 (BHS at byte 0): BTS-1 says 5 message(s), 1 found" in r.output
    stray = next(p for m, p, x in stored(sessions) if m.status == "exception")
    assert stray.raw == b"ZZX|not a message\r"


def test_wrong_input_is_a_clear_error_and_creates_nothing(
    tmp_path, recon, sessions, mllp_lab, fhir_connection
):
    data, _ = hl7_batch(mllp_lab)
    hl7_file = tmp_path / "batch.hl7"
    hl7_file.write_bytes(data)
    text_file = tmp_path / "notes.txt"
    text_file.write_bytes(b"Dear colleague,\nplease find attached\n")
    empty = tmp_path / "empty.hl7"
    empty.write_bytes(b"\r\n")

    cases = [
        ((hl7_file, "--connection", "nowhere"), "connection 'nowhere' not found"),
        ((text_file, "--connection", "mercy-lab"), "not an HL7 v2 batch file"),
        ((empty, "--connection", "mercy-lab"), "the file is empty"),
        (
            (hl7_file, "--connection", "mercy-epic"),
            "the file is HL7 v2 but connection 'mercy-epic' speaks fhir-r4",
        ),
        ((hl7_file, "--connection", "mercy-lab", "--as", "ghost"), "no user 'ghost'"),
    ]
    for args, message in cases:
        r = recon("import", *args)
        assert r.exit_code == 2 and f"error: {message}" in r.output, (args, r.output)
    assert stored(sessions) == []
    with transaction(sessions, read_only=True) as s:
        assert by_username(s, "importer") is None  # not even the importer
    assert recon("import", tmp_path / "missing.hl7", "--connection", "mercy-lab").exit_code == 2


def test_as_names_another_service_user_and_refuses_a_console_user(tmp_path, recon, sessions, users, mllp_lab):
    data, _ = hl7_batch(mllp_lab)
    path = tmp_path / "batch.hl7"
    path.write_bytes(data)
    r = recon("import", path, "--connection", "mercy-lab", "--as", "rita")
    assert r.exit_code == 2 and "may not submit messages" in r.output
    r = recon("import", path, "--connection", "mercy-lab", "--as", "svc")
    assert r.exit_code == 0 and "as svc: 3 new" in r.output
    with transaction(sessions, read_only=True) as s:
        assert {m.client_id for m in s.scalars(sa.select(Message))} == {users["svc"].id}
        assert s.scalar(sa.select(User).where(User.username == "importer")) is None


def test_the_same_file_to_a_second_connection_is_refused_up_front(tmp_path, recon, sessions, mllp_lab):
    with transaction(sessions) as s:
        connections.add_connection(
            s, "mercy-lab-2", customer="Mercy Labs", protocol="hl7v2-mllp", endpoint="127.0.0.1:1"
        )
    data, _ = hl7_batch(mllp_lab)
    path = tmp_path / "batch.hl7"
    path.write_bytes(data)
    assert recon("import", path, "--connection", "mercy-lab").exit_code == 0
    r = recon("import", path, "--connection", "mercy-lab-2")
    assert r.exit_code == 2 and "already imported to connection 'mercy-lab'" in r.output
    assert len(stored(sessions)) == 3
