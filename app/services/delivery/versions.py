"""The pinned FHIR version, checked again on a schedule (issue 6, "Faults").

A worker's adapter checks the EHR's CapabilityStatement before its first create, but an EHR
upgraded mid-run (4.0.1 → 4.3.0) would go on receiving creates from every worker that already
checked. So one worker for all (the shared housekeeping schedule, `VERSION_CHECK_STEP`) fetches
each enabled FHIR connection's CapabilityStatement every `RECON_VERSION_CHECK_SECONDS` (default
300) — sooner for a connection whose last attempt failed with a `config`-looking answer — and stores
the verdict on the connection: `version_mismatch` set stops every worker's creates at the gate
(a `config` exception, nothing sent); a later matching check clears it. Each change is audited.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import Connection
from app.db.session import transaction
from app.domain.delivery import Protocol

from .. import audit, connections
from ..clock import utcnow
from .runtime import Runtime

log = logging.getLogger("recon.delivery")

VERSION_CHECK_STEP = "version_check"
CHECK_STEP_SECONDS = 15.0  # how often the step looks for a connection due a check


def version_check_seconds() -> float:
    """RECON_VERSION_CHECK_SECONDS: how old a connection's last check may get (default 300)."""
    try:
        return max(float(os.environ.get("RECON_VERSION_CHECK_SECONDS", "300")), 1.0)
    except ValueError:
        return 300.0


def check_pinned_versions(rt: Runtime, *, force: bool = False) -> int:
    """Check every enabled, unpaused FHIR connection due a check (never checked, checked longer
    ago than the interval, or marked for a check by a config-looking failure). Returns how many
    were checked. The fetch runs outside any transaction."""
    now = utcnow()
    cutoff = now - timedelta(seconds=version_check_seconds())
    with transaction(rt.sessions, read_only=True) as s:
        due = s.scalars(
            sa.select(Connection).where(
                Connection.protocol == Protocol.FHIR_R4,
                Connection.enabled.is_(True),
                *(
                    ()
                    if force
                    else (
                        sa.or_(
                            Connection.version_checked_at.is_(None), Connection.version_checked_at <= cutoff
                        ),
                    )
                ),
            )
        ).all()
    checked = 0
    for conn in due:
        if connections.is_paused(conn, now):
            continue
        adapter = rt.adapter_factory(conn)
        if not hasattr(adapter, "check_connection"):
            continue
        result = adapter.check_connection()
        record_version_check(rt, conn.id, result)
        if not result.get("ok") and hasattr(adapter, "forget_version_check"):
            adapter.forget_version_check()
        checked += 1
    return checked


def record_version_check(rt: Runtime, connection_id: int, result: dict) -> None:
    """Store one check's verdict. A wrong version sets `version_mismatch` (creates stop); a match
    clears it; an EHR that did not answer usefully changes neither (the adapter's own check before
    a create still applies)."""
    with transaction(rt.sessions) as s:
        conn = s.get(Connection, connection_id, with_for_update=True, populate_existing=True)
        conn.version_checked_at = utcnow()
        reported = result.get("fhirVersion")
        if reported is None:
            return
        mismatch = None if result.get("ok") else result.get("detail") or f"EHR reports fhirVersion {reported}"
        if mismatch == conn.version_mismatch:
            return
        conn.version_mismatch = mismatch
        audit.record(
            s,
            actor="system:worker",
            action="connection.version_mismatch" if mismatch else "connection.version_ok",
            subject_type="connection",
            subject_id=conn.id,
            reason=(mismatch or f"fhirVersion {reported} matches the pinned {conn.fhir_version}")[:500],
            details={"reported": reported, "pinned": conn.fhir_version},
        )
    if mismatch:
        log.warning("connection %s: %s; creates stopped", conn.name, mismatch)


def recheck_soon(conn: Connection) -> None:
    """A config-looking failure on this connection: the next scheduled pass checks it again."""
    if conn.protocol == Protocol.FHIR_R4:
        conn.version_checked_at = None
