"""PHI views and PHI retention (issue 7; docs/SECURITY.md "PHI").

`record_phi_view` is the one way a full payload is shown: it writes a `phi.view` audit event for
that user, in the caller's transaction (so before the response is sent), de-duplicated on the
server per (user, exception, payload version) within a window — never through the session cookie,
so logging out and in again, or a second user in the same browser, changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import (
    Attempt,
    AuditEvent,
    AuditPending,
    Decision,
    ExceptionItem,
    Message,
    MessageIdentifier,
    PayloadVersion,
    PhiViewMark,
    Replay,
    User,
)
from app.db.session import transaction
from app.domain.phi import Redactor, phi_identifiers, reference_forms
from app.domain.states import ExceptionState, MessageState

from . import audit
from .clock import utcnow

DEFAULT_VIEW_WINDOW_MINUTES = 15.0


def view_window() -> timedelta:
    """RECON_PHI_VIEW_WINDOW_MINUTES (default 15): one `phi.view` per (user, exception, payload
    version) within this window."""
    return timedelta(
        minutes=float(os.environ.get("RECON_PHI_VIEW_WINDOW_MINUTES", DEFAULT_VIEW_WINDOW_MINUTES))
    )


def record_phi_view(
    session: so.Session,
    user: User,
    exception: ExceptionItem,
    payload_version: PayloadVersion | int | None,
    *,
    channel: str = "console",
    window: timedelta | None = None,
) -> bool:
    """Audit that `user` is shown the full content of `payload_version` (a PayloadVersion or its
    version number; None: the message's current version) of `exception`. Call before the content
    is sent, in the transaction that loads it. Returns True when an event was written, False when
    the same user's view of the same version was audited within the window."""
    if isinstance(payload_version, PayloadVersion):
        version = payload_version.version
    elif payload_version is None:
        current = exception.message.current_payload
        version = current.version if current is not None else 0
    else:
        version = int(payload_version)
    _note_payload_shown()  # this response may carry the content: covered by a (recent) phi.view
    now = utcnow()
    window = view_window() if window is None else window
    key = {"user_id": user.id, "exception_id": exception.id, "payload_version": version}
    mark = _locked_mark(session, key)
    if mark is None:
        try:
            with session.begin_nested():
                mark = PhiViewMark(**key, recorded_at=now)
                session.add(mark)
        except sa.exc.IntegrityError:
            # Another request of this user inserted it first; its event counts for this one too
            # unless the window had passed (it cannot have: it was just written).
            mark = _locked_mark(session, key)
            if mark is None or mark.recorded_at > now - window:
                return False
            mark.recorded_at = now
    elif mark.recorded_at > now - window:
        return False
    else:
        mark.recorded_at = now
    audit.record(
        session,
        actor=user.username,
        action="phi.view",
        subject_type="exception",
        subject_id=exception.id,
        details={"message_id": exception.message_id, "payload_version": version, "channel": channel},
    )
    return True


def _locked_mark(session: so.Session, key: dict) -> PhiViewMark | None:
    # FOR UPDATE on PostgreSQL: two requests of one user serialise on the mark, so one writes.
    return session.scalars(
        sa.select(PhiViewMark).filter_by(**key).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()


# --- which messages a request showed: the request-scoped collector ---------------------------------


@dataclass
class PhiScope:
    """What one request (or job) loaded that can carry a message's identifiers, gathered by the ORM
    load events below — the services register nothing by hand — and whether it showed a full
    payload (a PHI view was recorded or was still covered by one)."""

    message_ids: set[str] = field(default_factory=set)
    exception_ids: set[int] = field(default_factory=set)
    replay_ids: set[int] = field(default_factory=set)
    references: set[str] = field(default_factory=set)  # patient references seen on loaded messages
    payload_shown: bool = False

    def empty(self) -> bool:
        return not (self.message_ids or self.exception_ids or self.replay_ids or self.references)


_scope: ContextVar[PhiScope | None] = ContextVar("recon_phi_scope", default=None)


def open_scope() -> PhiScope:
    """Start collecting for this request (the web layer calls it before each request)."""
    scope = PhiScope()
    _scope.set(scope)
    return scope


def current_scope() -> PhiScope | None:
    return _scope.get()


def close_scope() -> None:
    _scope.set(None)


def _note_payload_shown() -> None:
    scope = _scope.get()
    if scope is not None:
        scope.payload_shown = True


@sa.event.listens_for(Message, "load")
def _message_loaded(message: Message, _context) -> None:
    scope = _scope.get()
    if scope is not None:
        values = message.__dict__  # what the load brought; never a lazy load from an event
        scope.message_ids.add(values["id"])
        if values.get("patient_ref"):
            scope.references.add(values["patient_ref"])


@sa.event.listens_for(ExceptionItem, "load")
def _exception_loaded(item: ExceptionItem, _context) -> None:
    scope = _scope.get()
    if scope is not None and item.__dict__.get("message_id"):
        scope.message_ids.add(item.__dict__["message_id"])


for _model in (Attempt, PayloadVersion, Replay):

    @sa.event.listens_for(_model, "load")
    def _row_with_message_loaded(row, _context) -> None:
        scope = _scope.get()
        if scope is not None and row.__dict__.get("message_id"):
            scope.message_ids.add(row.__dict__["message_id"])


@sa.event.listens_for(Decision, "load")
def _decision_loaded(decision: Decision, _context) -> None:
    scope = _scope.get()
    if scope is not None and decision.__dict__.get("exception_id"):
        scope.exception_ids.add(decision.__dict__["exception_id"])


for _model in (AuditEvent, AuditPending):

    @sa.event.listens_for(_model, "load")
    def _event_loaded(event, _context) -> None:
        # An audit event's reason and details are about its subject's message.
        scope = _scope.get()
        if scope is not None:
            _add_subject(scope, event.__dict__.get("subject_type"), event.__dict__.get("subject_id"))


def _add_subject(scope: PhiScope, subject_type: str | None, subject_id: str | None) -> None:
    if not subject_id:
        return
    if subject_type == "message":
        scope.message_ids.add(str(subject_id))
    elif subject_type in ("exception", "replay") and str(subject_id).isdigit() and len(str(subject_id)) < 11:
        (scope.exception_ids if subject_type == "exception" else scope.replay_ids).add(int(subject_id))


# --- the identifiers of those messages --------------------------------------------------------------

# Identifiers extracted from one payload (by sha256, content type and message type): parsed once
# per process.
_EXTRACTED: OrderedDict[tuple[str, str, str], frozenset[str]] = OrderedDict()
_EXTRACTED_MAX = 20_000
_EXTRACTED_LOCK = threading.Lock()


def scope_identifiers(session: so.Session, scope: PhiScope) -> set[str]:
    """Every known identifier of every message `scope` collected: patient references and their
    bare ids, the stored patient identifiers (MRNs), and what each payload version carries
    (names, birth date, PID fields; app.domain.phi.phi_identifiers)."""
    message_ids = set(scope.message_ids)
    if scope.exception_ids:
        message_ids |= set(
            session.scalars(
                sa.select(ExceptionItem.message_id).where(ExceptionItem.id.in_(sorted(scope.exception_ids)))
            )
        )
    if scope.replay_ids:
        message_ids |= set(
            session.scalars(sa.select(Replay.message_id).where(Replay.id.in_(sorted(scope.replay_ids))))
        )
    found: set[str] = set()
    for reference in scope.references:
        found |= reference_forms(reference)
    if message_ids:
        found |= message_identifiers(session, message_ids)
    return found


def message_identifiers(session: so.Session, message_ids: Iterable[str]) -> set[str]:
    """The known identifiers of these messages (see scope_identifiers)."""
    ids = sorted(set(message_ids))
    found: set[str] = set()
    kinds: dict[str, tuple[str, str]] = {}
    for chunk in _chunked(ids, 500):
        for message_id, reference, content_type, message_type in session.execute(
            sa.select(Message.id, Message.patient_ref, Message.content_type, Message.message_type).where(
                Message.id.in_(chunk)
            )
        ):
            found |= reference_forms(reference)
            kinds[message_id] = (content_type, message_type)
        for kind, value in session.execute(
            sa.select(MessageIdentifier.kind, MessageIdentifier.value).where(
                MessageIdentifier.message_id.in_(chunk)
            )
        ):
            if kind in ("patient", "patient_id"):
                found |= reference_forms(value)
        # Keyed by content (sha256 of the stored bytes) and how it is read, never by row id: a
        # cached entry can only ever be the extraction of the very same payload.
        versions = [
            (vid, (sha256, *kinds.get(message_id, ("", ""))))
            for vid, message_id, sha256 in session.execute(
                sa.select(PayloadVersion.id, PayloadVersion.message_id, PayloadVersion.sha256).where(
                    PayloadVersion.message_id.in_(chunk), PayloadVersion.purged_at.is_(None)
                )
            )
        ]
        with _EXTRACTED_LOCK:
            missing = {vid: key for vid, key in versions if key not in _EXTRACTED}
            for _vid, key in versions:
                if key in _EXTRACTED:
                    _EXTRACTED.move_to_end(key)
                    found |= _EXTRACTED[key]
        for part in _chunked(sorted(missing), 200):
            for vid, text in session.execute(
                sa.select(PayloadVersion.id, PayloadVersion.text).where(PayloadVersion.id.in_(part))
            ):
                key = missing[vid]
                values = frozenset(phi_identifiers(key[1], text, key[2]))
                found |= values
                with _EXTRACTED_LOCK:
                    _EXTRACTED[key] = values
                    while len(_EXTRACTED) > _EXTRACTED_MAX:
                        _EXTRACTED.popitem(last=False)
    return found


def _chunked(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def redactor_for(identifiers: Iterable[str]) -> Redactor:
    """A Redactor for these identifiers; the same set (a page polled again) reuses the compiled one."""
    return _cached_redactor(frozenset(identifiers))


@lru_cache(maxsize=64)
def _cached_redactor(identifiers: frozenset[str]) -> Redactor:
    return Redactor(identifiers)


# --- streamed audit exports -------------------------------------------------------------------------

EXPORT_FORMATS = {
    "text/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/fhir+ndjson": "fhir-ndjson",
}
_REDACTED_FIELDS = ("reason", "details")


def redact_export(sessions: so.sessionmaker, chunks: Iterable[str | bytes], fmt: str) -> Iterator[str]:
    """An audit export (app.services.audit_export.stream_export: chunks of whole records) with the
    known identifiers of each event's subject masked in its reason and details — for a role the
    PHI rule masks. Chunks with nothing to mask pass through unchanged; a masked record's hashes
    are those of the stored event, so only an unmasked export (`recon audit export`) re-verifies."""
    from .audit_export import CSV_COLUMNS

    subject_type_at, subject_id_at = CSV_COLUMNS.index("subject_type"), CSV_COLUMNS.index("subject_id")
    csv_fields = [CSV_COLUMNS.index(name) for name in _REDACTED_FIELDS]
    for chunk in chunks:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        if fmt == "csv":
            records = list(csv.reader(io.StringIO(text)))
            subjects = [(r[subject_type_at], r[subject_id_at]) for r in records if len(r) == len(CSV_COLUMNS)]
        else:
            records = [_json_or_none(line) for line in text.splitlines()]
            subjects = [_json_subject(r, fmt) for r in records if r is not None]
        scope = PhiScope()
        for subject_type, subject_id in subjects:
            _add_subject(scope, subject_type, subject_id)
        if scope.empty():
            yield text
            continue
        with transaction(sessions, read_only=True) as s:
            redactor = redactor_for(scope_identifiers(s, scope))
        if not redactor.found_in(text):
            yield text
            continue
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            for record in records:
                if len(record) == len(CSV_COLUMNS):
                    for at in csv_fields:
                        record[at] = redactor.text(record[at])
                writer.writerow(record)
            yield out.getvalue()
        else:
            yield "".join(
                _redacted_json_line(line, record, fmt, redactor)
                for line, record in zip(text.splitlines(), records, strict=True)
            )


def _json_or_none(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_subject(record: dict, fmt: str) -> tuple[str | None, str | None]:
    if fmt == "jsonl":
        return record.get("subject_type"), record.get("subject_id")
    try:
        identifier = record["entity"][0]["what"]["identifier"]
        return identifier["system"].removeprefix("urn:recon:"), identifier["value"]
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None


def _redacted_json_line(line: str, record: dict | None, fmt: str, redactor: Redactor) -> str:
    if record is None or not redactor.found_in(line):
        return line + "\n"
    if fmt == "jsonl":
        for name in _REDACTED_FIELDS:
            record[name] = redactor.data(record.get(name))
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    for entity in record.get("entity") or []:
        for detail in entity.get("detail") or []:
            if detail.get("type") in _REDACTED_FIELDS and isinstance(detail.get("valueString"), str):
                detail["valueString"] = redactor.text(detail["valueString"])
    return json.dumps(record, ensure_ascii=False) + "\n"


# --- retention: delivered messages' payloads --------------------------------------------------------

DEFAULT_RETENTION_DAYS = 90
PURGE_BATCH = 500


def retention_days() -> int:
    """RECON_PAYLOAD_RETENTION_DAYS (default 90): how long a delivered message keeps its payload."""
    days = int(os.environ.get("RECON_PAYLOAD_RETENTION_DAYS", DEFAULT_RETENTION_DAYS))
    if days < 1:
        raise ValueError("RECON_PAYLOAD_RETENTION_DAYS must be at least 1")
    return days


@dataclass(frozen=True)
class PurgeResult:
    messages: int
    versions: int
    bytes: int
    cutoff: datetime
    dry_run: bool


def _purgeable(cutoff: datetime):
    """Delivered messages last changed before `cutoff` that still hold payload bytes and have no
    exception outside the final states (an unresolved item keeps everything)."""
    unresolved = sa.exists().where(
        ExceptionItem.message_id == Message.id,
        ExceptionItem.state.not_in([ExceptionState.RESOLVED.value, ExceptionState.DISCARDED.value]),
    )
    unpurged = sa.exists().where(PayloadVersion.message_id == Message.id, PayloadVersion.purged_at.is_(None))
    return sa.select(Message.id).where(
        Message.status == MessageState.DELIVERED.value, Message.updated_at <= cutoff, unpurged, ~unresolved
    )


def purge_payloads(
    sessions: so.sessionmaker,
    *,
    days: int | None = None,
    actor: str = "system:retention",
    dry_run: bool = False,
    now: datetime | None = None,
) -> PurgeResult:
    """PHI minimisation: empty the payload bytes and text of every version of the delivered
    messages older than the retention period, keeping each version's sha256, its size and the
    purge time. Unresolved items and the audit log are never purged. Each batch of up to
    PURGE_BATCH messages commits with its own `payload.purged` audit event (the counts); a dry
    run only counts."""
    now = now or utcnow()
    days = days if days is not None else retention_days()
    cutoff = now - timedelta(days=days)
    messages = versions = size = 0
    while True:
        with transaction(sessions, read_only=dry_run) as s:
            query = _purgeable(cutoff).order_by(Message.id)
            ids = list(s.scalars(query if dry_run else query.limit(PURGE_BATCH)))
            if not ids:
                break
            where = (PayloadVersion.message_id.in_(ids), PayloadVersion.purged_at.is_(None))
            count, total = s.execute(
                sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(sa.func.length(PayloadVersion.raw)), 0)
                ).where(*where)
            ).one()
            messages, versions, size = messages + len(ids), versions + count, size + int(total)
            if dry_run:
                break
            # SET expressions read the row as it was: the size is the purged bytes' length.
            s.execute(
                sa.update(PayloadVersion)
                .where(*where)
                .values(size_bytes=sa.func.length(PayloadVersion.raw), raw=b"", text=None, purged_at=now)
                .execution_options(synchronize_session=False)
            )
            audit.record(
                s,
                actor=actor,
                action="payload.purged",
                subject_type="payload",
                subject_id="retention",
                details={
                    "messages": len(ids),
                    "versions": count,
                    "bytes": int(total),
                    "cutoff": cutoff.isoformat(),
                    "retention_days": days,
                },
            )
        if len(ids) < PURGE_BATCH:
            break
    return PurgeResult(messages, versions, size, cutoff, dry_run)
