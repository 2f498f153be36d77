"""Audit exports (SPEC 6): CSV, JSON Lines and FHIR R4 AuditEvent NDJSON, streamed in
constant memory. Each export is itself audited and ends with the chain head it covers."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime

import sqlalchemy.orm as so

from app.db.models import AuditEvent
from app.db.session import transaction
from app.domain.audit_chain import EVENT_FIELDS, format_timestamp

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


def _fhir_audit_event(event: AuditEvent) -> dict:
    """One event as a FHIR R4 AuditEvent resource (bulk-data NDJSON line)."""
    system_actor = event.actor.startswith("system:")
    outcome = "4" if event.action.endswith("failed") else "0"
    entity = {
        "what": {"identifier": {"system": f"urn:recon:{event.subject_type}", "value": event.subject_id}},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object",
        },
        "detail": [
            {"type": k, "valueString": v if isinstance(v, str) else json.dumps(v, sort_keys=True)}
            for k, v in (
                ("from_state", event.from_state),
                ("to_state", event.to_state),
                ("reason", event.reason),
                ("reason_code", event.reason_code),
                ("details", event.details or None),
                ("prev_hash", event.prev_hash),
                ("hash", event.hash),
            )
            if v not in (None, "")
        ],
    }
    return {
        "resourceType": "AuditEvent",
        "id": str(event.id),
        "type": {"system": "urn:recon:audit-action", "code": event.action},
        "action": "R" if event.action in ("phi.view", "audit.export") else "U",
        "recorded": format_timestamp(event.occurred_at).replace("Z", "+00:00"),
        "outcome": outcome,
        "agent": [
            {
                "who": {"identifier": {"system": "urn:recon:user", "value": event.actor}},
                "requestor": not system_actor,
            }
        ],
        "source": {"observer": {"display": "Reconciliation Console"}},
        "entity": [entity],
    }


def _line(fmt: str, event: AuditEvent) -> str:
    if fmt == "jsonl":
        return json.dumps(event_json(event), ensure_ascii=False, sort_keys=True) + "\n"
    if fmt == "fhir-ndjson":
        return json.dumps(_fhir_audit_event(event), ensure_ascii=False) + "\n"
    buf = io.StringIO()
    row = event_json(event)
    row["details"] = json.dumps(row["details"], sort_keys=True, ensure_ascii=False)
    csv.writer(buf).writerow([row[c] if row[c] is not None else "" for c in CSV_COLUMNS])
    return buf.getvalue()


def stream_export(
    sessions: so.sessionmaker,
    fmt: str,
    *,
    actor: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[str]:
    """Yield the export line by line. The export is audited first; the last line names the
    chain head (id and hash) that the export covers."""
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
        head_id, head_hash, head_at = marker.id, marker.hash, marker.occurred_at
    if fmt == "csv":
        yield ",".join(CSV_COLUMNS) + "\r\n"
    # A read-only transaction: on SQLite a long export must not hold the write lock.
    with transaction(sessions, read_only=True) as session:
        for event in audit.iter_events(session, since=since, until=until):
            if event.id > head_id:
                break
            yield _line(fmt, event)
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
