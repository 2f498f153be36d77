"""Audit exports (SPEC 6): CSV, JSON Lines and FHIR R4 AuditEvent NDJSON, streamed in
constant memory from plain rows. Each export is itself audited and ends with the chain head it
covers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime

import sqlalchemy.orm as so

from app.db.models import AuditEvent
from app.db.session import transaction
from app.domain.audit_chain import EVENT_FIELDS, ROW_COLUMNS, format_timestamp, timestamp_text
from app.domain.csv_safe import neutralise_row

from . import audit

FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "fhir-ndjson": "application/fhir+ndjson",
}
CSV_COLUMNS = (*EVENT_FIELDS, "prev_hash", "hash")


def event_json(event: AuditEvent) -> dict:
    """The API/JSON Lines shape of one event."""
    out = event.as_dict()
    out["occurred_at"] = format_timestamp(event.occurred_at)
    return out


def _fhir_audit_event(event: dict) -> dict:
    """One event (a stored row as a mapping: time as text, details as JSON text or None) as a
    FHIR R4 AuditEvent resource (bulk-data NDJSON line)."""
    system_actor = event["actor"].startswith("system:")
    outcome = "4" if event["action"].endswith("failed") else "0"
    entity = {
        "what": {
            "identifier": {"system": "urn:recon:" + event["subject_type"], "value": event["subject_id"]}
        },
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object",
        },
        "detail": [
            {"type": k, "valueString": v if isinstance(v, str) else json.dumps(v, sort_keys=True)}
            for k, v in (
                ("from_state", event["from_state"]),
                ("to_state", event["to_state"]),
                ("reason", event["reason"]),
                ("reason_code", event["reason_code"]),
                ("details", event["details"]),
                ("prev_hash", event["prev_hash"]),
                ("hash", event["hash"]),
            )
            if v not in (None, "")
        ],
    }
    return {
        "resourceType": "AuditEvent",
        "id": str(event["id"]),
        "type": {"system": "urn:recon:audit-action", "code": event["action"]},
        "action": "R" if event["action"] in ("phi.view", "audit.export") else "U",
        "recorded": event["occurred_at"].replace("Z", "+00:00"),
        "outcome": outcome,
        "agent": [
            {
                "who": {"identifier": {"system": "urn:recon:user", "value": event["actor"]}},
                "requestor": not system_actor,
            }
        ],
        "source": {"observer": {"display": "Reconciliation Console"}},
        "entity": [entity],
    }


_esc = json.encoder.encode_basestring


def _opt(value: str | None) -> str:
    return "null" if value is None else _esc(value)


def jsonl_line(row: tuple) -> str:
    """One stored row (audit.stream_rows) as a JSON Lines record: sorted keys, no whitespace,
    details as stored (the sealer stores it canonical). Without prev_hash and hash, the record
    is exactly the canonical JSON that was hashed."""
    (id_, at, actor, action, subject_type, subject_id, from_state, to_state, reason, reason_code, details) = (
        row[:11]
    )
    return (
        f'{{"action":{_esc(action)},"actor":{_esc(actor)},"details":{details},'
        f'"from_state":{_opt(from_state)},"hash":{_esc(row[12])},"id":{id_},"occurred_at":{_esc(timestamp_text(at))},'
        f'"prev_hash":{_esc(row[11])},"reason":{_opt(reason)},"reason_code":{_opt(reason_code)},'
        f'"subject_id":{_esc(subject_id)},"subject_type":{_esc(subject_type)},"to_state":{_opt(to_state)}}}\n'
    )


def _fhir_line(row: tuple) -> str:
    event = dict(zip(ROW_COLUMNS, row, strict=True))
    event["occurred_at"] = timestamp_text(event["occurred_at"])
    details = event["details"]
    event["details"] = None if details in (None, "{}") else details
    return json.dumps(_fhir_audit_event(event), ensure_ascii=False) + "\n"


def _batches(rows: Iterator[tuple], size: int = 1000) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chunks(fmt: str, rows: Iterator[tuple]) -> Iterator[str]:
    """The export body, a chunk of lines at a time (one write per chunk, not per line)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        for batch in _batches(rows):
            # Columns are CSV_COLUMNS; None is written as "". A cell a spreadsheet would run as a
            # formula gets one leading quote (app/domain/csv_safe.py).
            writer.writerows(neutralise_row((r[0], timestamp_text(r[1]), *r[2:])) for r in batch)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        return
    line = jsonl_line if fmt == "jsonl" else _fhir_line
    for batch in _batches(rows):
        yield "".join(map(line, batch))


def _seal_marker(sessions: so.sessionmaker, marker) -> tuple[int, str, datetime]:
    """The sealed id and hash of the export's own event (sealed right after its commit; if
    another sealer was slow, seal again, waiting longer)."""
    for timeout in (0.0, 30.0):
        if timeout:
            audit.seal(sessions, wait_for=marker.seq, timeout=timeout)
        with transaction(sessions, read_only=True) as s:
            event = audit.sealed_event_for(s, marker)
            if event is not None:
                return event.id, event.hash, event.occurred_at
    raise RuntimeError("the export's own audit event was not sealed: is the audit sealer failing?")


def stream_export(
    sessions: so.sessionmaker,
    fmt: str,
    *,
    actor: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[str]:
    """Yield the export in chunks of whole lines. The export is audited first; the last line
    names the chain head (id and hash) that the export covers: every sealed event up to its own.

    Rows are streamed as plain tuples in a read-only snapshot (no ORM objects, constant memory,
    no lock that a writer or the sealer waits for)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    with transaction(sessions) as s:
        marker = audit.record(
            s,
            actor=actor,
            action="audit.export",
            subject_type="audit",
            subject_id="export",
            details={
                "format": fmt,
                "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None,
            },
        )
    head_id, head_hash, head_at = _seal_marker(sessions, marker)
    if fmt == "csv":
        yield ",".join(CSV_COLUMNS) + "\r\n"
    with audit.reader(sessions.kw["bind"]) as conn, conn.begin():
        where, params = ["id <= :head_id"], {"head_id": head_id}
        if since:
            where.append("occurred_at >= :since")
            params["since"] = audit.db_time(conn, since)
        if until:
            where.append("occurred_at < :until")
            params["until"] = audit.db_time(conn, until)
        yield from _chunks(fmt, audit.stream_rows(conn, " AND ".join(where), params, name="audit_export"))
    trailer = {"chain_head": {"id": head_id, "hash": head_hash}}
    if fmt == "csv":
        yield f"# chain_head id={head_id} hash={head_hash}\r\n"
    elif fmt == "jsonl":
        yield json.dumps(trailer) + "\n"
    else:
        # Bulk-data NDJSON holds one resource per line, so the head is a final AuditEvent of
        # type 'chain-head' that tells a consumer what the file covers.
        yield (
            json.dumps(
                {
                    "resourceType": "AuditEvent",
                    "id": f"chain-head-{head_id}",
                    "type": {"system": "urn:recon:audit-action", "code": "chain-head"},
                    "recorded": format_timestamp(head_at).replace("Z", "+00:00"),
                    "outcome": "0",
                    "agent": [{"who": {"display": "Reconciliation Console"}, "requestor": False}],
                    "source": {"observer": {"display": "Reconciliation Console"}},
                    "entity": [
                        {
                            "what": {
                                "identifier": {"system": "urn:recon:audit-chain-head", "value": head_hash}
                            },
                            "detail": [{"type": "last_event_id", "valueString": str(head_id)}],
                        }
                    ],
                }
            )
            + "\n"
        )
