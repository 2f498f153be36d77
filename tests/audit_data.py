"""A large, valid audit chain generated fast (tests and benchmarks).

The rows satisfy the real schema and triggers (plain INSERTs into audit_events, then the head
row moved to the last event, exactly as the sealer leaves them); hashes are the real ones,
computed in Python in one pass (canonical JSON assembled from text, checked against the
domain's `chain_hash` on a sample). PostgreSQL: COPY; SQLite: executemany.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import sqlalchemy as sa

from app.domain.audit_chain import GENESIS_HASH, canonical_json_of_row, chain_hash, row_event

ACTIONS = ("decision.comment", "message.receive", "exception.open", "message.deliver", "phi.view")


def chain_rows(
    count: int, *, start_id: int = 1, prev_hash: str = GENESIS_HASH, start: datetime | None = None
):
    """Yield (db_row, verify_row) for `count` chained events: db_row in column order for
    insertion (occurred_at as the database's text, details as canonical JSON text)."""
    start = start or datetime(2026, 1, 1)
    second = None
    prev = prev_hash
    for n in range(count):
        i = start_id + n
        if second is None or n % 1000 == 0:
            base = start + timedelta(seconds=n // 1000)
            second = base.strftime("%Y-%m-%d %H:%M:%S")
        micro = f"{(n % 1000) * 1000:06d}"
        action = ACTIONS[i % len(ACTIONS)]
        subject = str(i // 3)
        details = f'{{"n":{i},"text":"bench event {i % 97}"}}'
        reason = "benchmark note" if i % 2 else None
        verify_row = (
            i,
            f"{second.replace(' ', 'T')}.{micro}Z",
            "bench",
            action,
            "exception",
            subject,
            "open",
            "open",
            reason,
            None,
            details,
            prev,
            None,
        )
        digest = hashlib.sha256((prev + canonical_json_of_row(verify_row)).encode()).hexdigest()
        yield (
            (
                i,
                f"{second}.{micro}",
                "bench",
                action,
                "exception",
                subject,
                "open",
                "open",
                reason,
                None,
                details,
                prev,
                digest,
            ),
            verify_row[:12] + (digest,),
        )
        prev = digest


def fill_chain(engine: sa.Engine, count: int) -> str:
    """Append `count` generated events to the (empty or not) chain; returns the new head hash."""
    with engine.begin() as conn:
        last_id, prev = conn.execute(sa.text("SELECT last_id, last_hash FROM audit_head WHERE id = 1")).one()
    head = prev
    sample_checked = False
    columns = (
        "id, occurred_at, actor, action, subject_type, subject_id, from_state, to_state, reason, "
        "reason_code, details, prev_hash, hash"
    )
    rows = chain_rows(count, start_id=last_id + 1, prev_hash=prev)
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        if engine.dialect.name == "postgresql":
            with raw.cursor() as cursor, cursor.copy(f"COPY audit_events ({columns}) FROM STDIN") as copy:
                for db_row, verify_row in rows:
                    if not sample_checked:
                        sample_checked = _check(verify_row)
                    copy.write_row(db_row)
                    head = db_row[-1]
        else:
            batch = []
            for db_row, verify_row in rows:
                if not sample_checked:
                    sample_checked = _check(verify_row)
                batch.append(db_row)
                head = db_row[-1]
                if len(batch) >= 10_000:
                    raw.executemany(
                        f"INSERT INTO audit_events ({columns}) VALUES ({','.join('?' * 13)})", batch
                    )
                    batch = []
            if batch:
                raw.executemany(f"INSERT INTO audit_events ({columns}) VALUES ({','.join('?' * 13)})", batch)
        conn.execute(
            sa.text("UPDATE audit_head SET last_id = :id, last_hash = :hash WHERE id = 1"),
            {"id": last_id + count, "hash": head},
        )
    return head


def _check(verify_row: tuple) -> bool:
    """The generator's hash is the domain's hash of the same event."""
    assert chain_hash(verify_row[11], row_event(verify_row)) == verify_row[12], "generator out of step"
    assert json.loads(verify_row[10])
    return True
