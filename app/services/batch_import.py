"""`recon import FILE --connection C`: every message of a batch file through the same intake as
`POST /api/v1/messages`.

Idempotency key per item: `import:<first 16 hex of the file's SHA-256>:<position>`, so importing
the same file again replays every item instead of creating it, and a run that stopped half-way
(crash, Ctrl-C) resumes where it stopped when re-run. Items commit in transactions of
`batch_size`, so a very large file never holds one huge transaction (nor the audit chain's head
lock for long).

The client is a service user: `importer` by default, created (role service, no password, no
token) by system:cli the first time it is needed; another service user with `as_user`.
"""

from __future__ import annotations

import base64
import hashlib
import mmap
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import sqlalchemy as sa
import sqlalchemy.orm as so
from sqlalchemy.exc import IntegrityError

from app.db.models import Connection, Message, User
from app.db.session import transaction
from app.domain.batch import FHIR_NDJSON, BatchItem, SplitReport, open_batch
from app.domain.delivery import Protocol
from app.domain.errors import Conflict, Forbidden, Invalid, NotFound
from app.domain.roles import Permission, has_permission

from . import audit, users
from .intake import submit_message

DEFAULT_IMPORTER = "importer"
ACTOR = "system:cli"
BATCH_SIZE = 200
_RETRIES = 3  # a transaction that lost a race on a key (another import of the same file) is redone


@dataclass
class ImportSummary:
    file_name: str
    digest: str  # SHA-256 of the whole file
    client: str
    connection: str
    report: SplitReport
    created: int = 0
    replayed: int = 0  # already imported: the key existed
    queued: int = 0  # created and queued for delivery
    exceptions: Counter = field(default_factory=Counter)  # created as an exception, by category

    @property
    def items(self) -> int:
        return self.created + self.replayed

    def lines(self) -> list[str]:
        """The summary a person reads at the end of `recon import`."""
        noun = "message" if self.items == 1 else "messages"
        new = f"{self.created} new"
        if self.created:
            exceptions = sum(self.exceptions.values())
            by_category = ", ".join(f"{c} {n}" for c, n in sorted(self.exceptions.items()))
            new += (
                f" ({self.queued} queued for delivery, {exceptions} exception{'' if exceptions == 1 else 's'}"
                + (f": {by_category})" if by_category else ")")
            )
        lines = [
            f"imported {self.items} {noun} from {self.file_name} ({self.report.describe()}) to "
            f"{self.connection} as {self.client}: {new}, {self.replayed} already imported"
        ]
        lines += [f"warning: {w}" for w in self.report.warnings]
        return lines


def key_prefix(digest: str) -> str:
    return f"import:{digest[:16]}:"


def item_key(digest: str, item: BatchItem) -> str:
    return f"{key_prefix(digest)}{item.position}"


def item_body(connection: str, content_type: str, item: BatchItem) -> dict:
    """The request body `POST /api/v1/messages` would receive for this item."""
    return {
        "connection": connection,
        "message_type": item.message_type,
        "content_type": content_type,
        "payload_base64": base64.b64encode(item.raw).decode("ascii"),
    }


@contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes without reading a large file into memory (an empty file cannot be mapped)."""
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            yield b""
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def _importer(session: so.Session, username: str | None) -> User:
    """The client the messages are submitted as; `importer` is created when missing."""
    name = username or DEFAULT_IMPORTER
    user = users.by_username(session, name)
    if user is None:
        if name != DEFAULT_IMPORTER:
            raise NotFound(f"no user {name!r} (create a service user, or leave out --as)")
        user = users.create_user(session, name, "service", None, actor=ACTOR)
    if not user.active:
        raise Forbidden(f"user {name!r} is deactivated")
    if not has_permission(user.role, Permission.SUBMIT_MESSAGES):
        raise Forbidden(f"user {name!r} ({user.role}) may not submit messages: use a service user")
    return user


def _check_connection(session: so.Session, name: str, report: SplitReport) -> Connection:
    conn = session.scalar(sa.select(Connection).where(Connection.name == name))
    if conn is None:
        raise NotFound(f"connection {name!r} not found", code="unknown_connection")
    wanted = Protocol.FHIR_R4 if report.format == FHIR_NDJSON else Protocol.HL7V2_MLLP
    if conn.protocol != wanted:
        what = "FHIR NDJSON" if report.format == FHIR_NDJSON else "HL7 v2"
        raise Invalid(f"the file is {what} but connection {name!r} speaks {conn.protocol}")
    return conn


def _check_not_imported_elsewhere(session: so.Session, client: User, digest: str, conn: Connection) -> None:
    """Keys name the file, not the connection: the same file to a second connection as the same
    client would reuse them with a different body. Refused up front, not item by item."""
    other = session.scalar(
        sa.select(Connection.name)
        .join(Message, Message.connection_id == Connection.id)
        .where(
            Message.client_id == client.id,
            Message.idempotency_key.like(key_prefix(digest) + "%"),
            Message.connection_id != conn.id,
        )
        .limit(1)
    )
    if other is not None:
        raise Conflict(
            f"this file was already imported to connection {other!r} as {client.username}; "
            f"to import it to {conn.name!r} as well, use --as with another service user"
        )


def import_file(
    sessions: so.sessionmaker[so.Session],
    path: Path,
    connection: str,
    *,
    as_user: str | None = None,
    batch_size: int = BATCH_SIZE,
    on_item: Callable[[BatchItem], None] | None = None,
) -> ImportSummary:
    """Import every item of the file at `path` (module docstring). Raises UnrecognisedFile,
    NotFound or Invalid before anything is created when the file or the target is wrong."""
    path = Path(path)
    with _mapped(path) as data:
        digest = hashlib.sha256(data).hexdigest()
        report, items = open_batch(data)  # UnrecognisedFile: nothing created
        with closing(items):  # a suspended split holds the mapped buffer: release it before unmapping
            with transaction(sessions) as s:
                conn = _check_connection(s, connection, report)
                client = _importer(s, as_user)
                _check_not_imported_elsewhere(s, client, digest, conn)
                client_id, client_name, conn_id, conn_name = client.id, client.username, conn.id, conn.name
            summary = ImportSummary(path.name, digest, client_name, conn_name, report)
            while chunk := list(islice(items, max(1, batch_size))):
                _submit_chunk(sessions, client_id, conn_name, digest, report.content_type, chunk, summary)
                if on_item is not None:
                    for item in chunk:
                        on_item(item)
    with transaction(sessions) as s:
        audit.record(
            s,
            actor=ACTOR,
            action="batch.import",
            subject_type="connection",
            subject_id=conn_id,
            details={
                "file": path.name,
                "sha256": digest,
                "format": report.format,
                "client": client_name,
                "items": summary.items,
                "created": summary.created,
                "already_imported": summary.replayed,
                "queued": summary.queued,
                "exceptions": dict(summary.exceptions),
                "warnings": report.warnings[:20],
            },
        )
    return summary


def _submit_chunk(sessions, client_id, conn_name, digest, content_type, chunk, summary) -> None:
    """One transaction for the chunk; counted only once it committed."""
    for attempt in range(_RETRIES):
        counts = ImportSummary(summary.file_name, digest, summary.client, conn_name, summary.report)
        try:
            with transaction(sessions) as s:
                client = s.get(User, client_id)
                for item in chunk:
                    result = submit_message(
                        s, client, item_key(digest, item), item_body(conn_name, content_type, item)
                    )
                    if result.replayed:
                        counts.replayed += 1
                        continue
                    counts.created += 1
                    if result.body.get("status") == "exception":
                        counts.exceptions[result.body.get("category", "unknown")] += 1
                    else:
                        counts.queued += 1
        except IntegrityError:
            # Another import of the same file committed some of these keys first: redo the chunk,
            # which now replays them.
            if attempt == _RETRIES - 1:
                raise
            continue
        summary.created += counts.created
        summary.replayed += counts.replayed
        summary.queued += counts.queued
        summary.exceptions.update(counts.exceptions)
        return
