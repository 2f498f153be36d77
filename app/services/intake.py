"""Intake (POST /api/v1/messages): store first, then deliver through the outbox.

The message, its idempotency key, its first payload version, its outbox row and
its audit event commit in one transaction. The hot path is SQLAlchemy Core: on PostgreSQL one
statement in its own transaction once the process knows the connection (see "one round trip"
below), else two round trips (a lookup that also draws the new rows' ids, then one INSERT of
every row as data-modifying CTEs); a refused message then opens its exception through the ORM.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
import sqlalchemy.orm as so
from psycopg.rows import namedtuple_row, tuple_row
from sqlalchemy.dialects import postgresql

from app.db.models import Attempt, Connection, Message, MessageIdentifier, OutboxEntry, PayloadVersion, User
from app.domain.categorize import categorize_reported_error
from app.domain.delivery import (
    DELIVER_JOB_PREFIX,
    Category,
    clinical_risk,
    control_id_for,
    deliver_job_id,
    routing_refusal,
)
from app.domain.errors import Invalid, NotFound
from app.domain.idempotency import request_fingerprint
from app.domain.identifiers import extract_identifiers
from app.domain.payloads import (
    CONTENT_TYPES,
    DRIFT_KINDS,
    PROPOSED_REPAIR,
    decode_payload,
    encode_text,
    is_unicode,
    patient_reference,
    sha256_hex,
)

from . import audit, connections, drift
from .clock import utcnow
from .exceptions import open_exception

DELIVERY_SYSTEM_PREFIX = "urn:recon:idempotency:"


class KeyReused(Invalid):
    code = "idempotency_key_reused"


@dataclass
class IntakeResult:
    status_code: int
    body: dict
    replayed: bool = False


def find_existing(session: so.Session, client: User, key: str) -> Message | None:
    return session.scalar(
        sa.select(Message).where(Message.client_id == client.id, Message.idempotency_key == key)
    )


def replay_response(existing: Message, fingerprint: str) -> IntakeResult:
    """Same key: the original response for the same body, 422 for a different one."""
    if existing.request_fingerprint != fingerprint:
        raise KeyReused("this Idempotency-Key was already used with a different request body")
    return IntakeResult(202, dict(existing.response_json), replayed=True)


def _raw_payload(body: dict) -> bytes:
    has_text, has_b64 = "payload" in body, "payload_base64" in body
    if has_text == has_b64:
        raise Invalid("send exactly one of payload or payload_base64", code="invalid_body")
    if has_text:
        if not isinstance(body["payload"], str):
            raise Invalid("payload must be a string", code="invalid_body")
        # A lone surrogate (JSON "\ud800") has no UTF-8 form: keep its bytes as sent; decoding then
        # fails and the payload becomes a data_shape exception, stored, instead of a 500.
        return body["payload"].encode("utf-8", "surrogatepass")
    if not isinstance(body["payload_base64"], str):
        raise Invalid("payload_base64 must be a string", code="invalid_body")
    try:
        return base64.b64decode(body["payload_base64"], validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("payload_base64 is not valid base64", code="invalid_body") from None


# The widest indexed text a message keeps beside its payload (Message.patient_ref,
# MessageIdentifier.value).
STORABLE_LENGTH = 200


def _storable(value: str) -> bool:
    return len(value) <= STORABLE_LENGTH and "\x00" not in value and is_unicode(value)


def _indexed_fields(body: dict, decoded):
    """The patient reference and identifiers read from the payload, and the decoded payload —
    marked as a data_shape problem when one of them cannot be stored (longer than its column, a
    lone surrogate from a JSON escape, a NUL): the payload is kept byte-for-byte all the same."""
    ref = patient_reference(body["content_type"], decoded.text, decoded.document)
    identifiers = extract_identifiers(body["content_type"], decoded.text, decoded.document)
    kept = [(k, v) for k, v in identifiers if _storable(k) and _storable(v)]
    if (ref is None or _storable(ref)) and len(kept) == len(identifiers):
        return ref, identifiers, decoded
    if not decoded.problem:
        decoded = dataclasses.replace(
            decoded,
            problem=(
                f"the patient reference or an identifier is longer than {STORABLE_LENGTH} characters "
                "or is not valid Unicode text"
            ),
            problem_kind="shape",
        )
    return (ref if ref is not None and _storable(ref) else None), kept, decoded


_MESSAGES = Message.__table__
_PAYLOADS = PayloadVersion.__table__
_IDENTIFIERS = MessageIdentifier.__table__
_ATTEMPTS = Attempt.__table__
_OUTBOX = OutboxEntry.__table__
_CONNECTIONS = Connection.__table__


@dataclass
class _Lookup:
    existing: sa.Row | None  # (request_fingerprint, response_json) of the message under this key
    connection: sa.Row | None  # the named connection's row (attributes as on the model)
    payload_id: int | None = None  # PostgreSQL: ids drawn for this request's rows
    attempt_id: int | None = None


# A connection's runtime state (its breaker, a maintenance window, the version check): it changes
# while messages flow, and intake reads none of it.
_RUNTIME_COLUMNS = (
    "consecutive_failures",
    "circuit_open_until",
    "circuit_probe_until",
    "paused_at",
    "paused_until",
    "paused_reason",
    "paused_by",
    "version_checked_at",
    "version_mismatch",
)
# PostgreSQL: a digest of every other column of the connection row (its settings, whatever
# columns are added later): what the fast path checks its cached copy against.
_SETTINGS_GUARD = sa.literal_column(
    "md5((to_jsonb(connections) - CAST(ARRAY["
    + ", ".join(f"'{name}'" for name in _RUNTIME_COLUMNS)
    + "] AS text[]))::text)",
    type_=sa.String,
)


def _lookup_statements() -> dict:
    """The lookup, built once per process (a statement built per request costs more CPU than
    its round trip; these are compiled once and only their parameters change)."""
    existing_on = sa.and_(
        _MESSAGES.c.client_id == sa.bindparam("client_id", type_=sa.Integer),
        _MESSAGES.c.idempotency_key == sa.bindparam("key", type_=sa.String),
    )
    one = sa.select(sa.literal(1).label("one")).subquery("one")
    columns = [
        _MESSAGES.c.request_fingerprint,
        _MESSAGES.c.response_json,
        *(c.label(f"c_{c.name}") for c in _CONNECTIONS.c),
    ]
    joined = one.outerjoin(
        _CONNECTIONS, _CONNECTIONS.c.name == sa.bindparam("name", type_=sa.String)
    ).outerjoin(_MESSAGES, existing_on)
    ids = [
        sa.func.nextval("payload_versions_id_seq").label("next_payload_id"),
        sa.func.nextval("attempts_id_seq").label("next_attempt_id"),
        # A request racing an uncommitted one with the same Idempotency-Key waits at most 10 s
        # for its row lock (then 409), never indefinitely — set here, not in a round trip of its own.
        sa.func.set_config("lock_timeout", "10s", True).label("lock_bound"),
    ]
    return {
        "existing": sa.select(_MESSAGES.c.request_fingerprint, _MESSAGES.c.response_json).where(existing_on),
        "sqlite": sa.select(*columns).select_from(joined),
        "postgresql": sa.select(*columns, *ids, _SETTINGS_GUARD.label("c_settings_guard")).select_from(
            joined
        ),
    }


_LOOKUP = _lookup_statements()


def _lookup(session: so.Session, client: User, key: str, body: dict) -> _Lookup:
    """One round trip: the message already stored under (client, key), the named connection and
    (PostgreSQL) the ids this request's payload and attempt will have, so that every row can
    then be written in one statement."""
    name = body.get("connection")
    params = {"client_id": client.id, "key": key}
    if not isinstance(name, str) or "\x00" in name or not is_unicode(name):  # refused below
        return _Lookup(session.execute(_LOOKUP["existing"], params).first(), None)
    pg = session.get_bind().dialect.name == "postgresql"
    # Core statements run on the session's connection: the ORM's execute path adds nothing here
    # and cost a fifth of the request's CPU.
    statement = _LOOKUP["postgresql" if pg else "sqlite"]
    row = _run(session, statement, {**params, "name": name})
    existing = _Existing(row.request_fingerprint, row.response_json) if row.request_fingerprint else None
    connection = None
    if row.c_id is not None:
        connection = _ConnectionRow(**{c.name: getattr(row, f"c_{c.name}") for c in _CONNECTIONS.c})
        if pg:
            _remember_connection(session.get_bind().pool, name, connection, row.c_settings_guard)
    return _Lookup(
        existing, connection, row.next_payload_id if pg else None, row.next_attempt_id if pg else None
    )


@dataclass(frozen=True)
class _Existing:
    request_fingerprint: str
    response_json: dict


class _ConnectionRow:
    """A connection's columns read by intake (what `connections.settings_for` and the exception
    path read from the model)."""

    def __init__(self, **columns):
        self.__dict__.update(columns)


def _validated(body: dict, found: _Lookup, *, require_error: bool = False):
    """The connection, message type and raw bytes of a request, or Invalid/NotFound."""
    for name in ("connection", "message_type", "content_type", *(("error",) if require_error else ())):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise Invalid(f"{name} is required", code="invalid_body")
        if name != "error" and not is_unicode(body[name]):
            raise Invalid(f"{name} must be valid Unicode text", code="invalid_body")
    if body["content_type"] not in CONTENT_TYPES:
        raise Invalid(f"content_type must be one of {', '.join(CONTENT_TYPES)}", code="invalid_body")
    raw = _raw_payload(body)
    if found.connection is None:
        raise NotFound(f"connection {body['connection']!r} not found", code="unknown_connection")
    return found.connection, body["message_type"].strip()[:40], raw


@dataclass
class _Stored:
    id: str
    status: str
    message_type: str
    clinical_risk: str
    payload_id: int
    decoded: object


def _decode(body: dict, conn, message_type: str, raw: bytes):
    decoded = decode_payload(
        raw,
        body["content_type"],
        message_type,
        diagnosis_code_system=connections.settings_for(conn).diagnosis_code_system,
    )
    return _indexed_fields(body, decoded)


def _store(
    session: so.Session,
    client: User,
    key: str,
    fingerprint: str,
    body: dict,
    conn,
    message_type: str,
    found: _Lookup,
    decoded_fields,
    *,
    status: str,
    audit_extra: dict,
) -> _Stored:
    """Every row of an accepted message, written with SQLAlchemy Core: the message, its first
    payload version byte-for-byte whatever it holds, its identifiers, a proposed repair, and —
    for a message that goes out — its attempt and outbox row; then its audit event. PostgreSQL:
    one statement (the ids were drawn in `_lookup`); SQLite: one insert per table. A racing
    duplicate key fails here on the unique (client, key) constraint (IntegrityError)."""
    patient_ref, identifiers, decoded = decoded_fields
    now = utcnow()
    pg = found.payload_id is not None
    message_id = str(uuid.uuid4())
    payload_row = _payload_row(message_id, decoded, client, now)
    message_row = _message_row(
        message_id, client, key, fingerprint, body, conn, message_type, patient_ref, status, now
    )
    message_row["current_payload_id"] = found.payload_id
    parts: list[tuple[str, dict]] = [("message", message_row)]
    if pg:
        parts.append(("payload_with_id", {"id": found.payload_id, **payload_row}))
        payload_id = found.payload_id
    else:
        _execute(session, parts.pop())  # the message first (payload_versions points at it)
        payload_id = _execute(session, ("payload", payload_row)).inserted_primary_key[0]
        session.execute(
            sa.update(_MESSAGES).where(_MESSAGES.c.id == message_id).values(current_payload_id=payload_id)
        )
    if identifiers:
        if pg:  # one statement whatever the count
            parts.append(
                (
                    "identifiers",
                    {
                        "message_id": message_id,
                        "rows": _identifiers_json(identifiers),
                    },
                )
            )
        else:
            session.execute(
                _statement("identifier"),
                [
                    {"identifier__message_id": message_id, "identifier__kind": k, "identifier__value": v}
                    for k, v in identifiers
                ],
            )
    if decoded.repair is not None:
        # Mojibake: the repaired text is kept as a *proposal* (version 2, not current). A reviewer
        # finds it in the correction editor; it is sent only as an approved corrected replay.
        repaired = encode_text(decoded.repair.repaired_text, body["content_type"])
        parts.append(
            (
                "payload",
                {
                    "message_id": message_id,
                    "version": 2,
                    "raw": repaired,
                    "text": decoded.repair.repaired_text,
                    "encoding": decoded.encoding,
                    "sha256": sha256_hex(repaired),
                    "created_by_id": None,
                    "reason": f"{PROPOSED_REPAIR}: mojibake at {decoded.repair.where} "
                    f"({decoded.repair.explanation})",
                    "created_at": now,
                },
            )
        )
    if status == "queued":
        attempt = _attempt_row(message_id, payload_id, now)
        if pg:
            attempt_id = found.attempt_id
            parts.append(("attempt_with_id", {"id": attempt_id, **attempt}))
        else:
            attempt_id = _execute(session, ("attempt", attempt)).inserted_primary_key[0]
        parts.append(("outbox", _outbox_row(attempt_id, now)))
        # The receive event in the same statement (a refused message records it after its
        # exception, as it always has).
        parts.append(
            (
                "event",
                _receive_params(client, message_id, status, key, conn, message_type, decoded, audit_extra),
            )
        )
    _execute_parts(session, parts)
    drift.record(session, conn.id, message_id, decoded.observations, now)
    return _Stored(message_id, status, message_type, message_row["clinical_risk"], payload_id, decoded)


def _message_row(message_id, client, key, fingerprint, body, conn, message_type, patient_ref, status, now):
    return {
        "id": message_id,
        "client_id": client.id,
        "idempotency_key": key,
        "request_fingerprint": fingerprint,
        "response_json": {"id": message_id, "idempotency_key": key, "status": status},
        "connection_id": conn.id,
        "message_type": message_type,
        "content_type": body["content_type"],
        "patient_ref": patient_ref,
        "clinical_risk": clinical_risk(message_type),
        "status": status,
        "delivery_system": DELIVERY_SYSTEM_PREFIX + client.username,
        "control_id": _control_id(key, client),
        "created_at": now,
        "updated_at": now,
    }


def _payload_row(message_id: str, decoded, client, now) -> dict:
    """The message's first payload version: the bytes as received, whatever they hold."""
    return {
        "message_id": message_id,
        "version": 1,
        "raw": decoded.raw,
        "text": decoded.text,
        "encoding": decoded.encoding,
        "sha256": decoded.sha256,
        "created_by_id": client.id,
        "reason": "intake",
        "created_at": now,
    }


def _attempt_row(message_id: str, payload_id: int | None, now) -> dict:
    """The queued first attempt (payload_id None: the fast path's statement draws it)."""
    return {
        "message_id": message_id,
        "payload_version_id": payload_id,
        "trigger": "intake",
        "started_at": now,
        "outcome": "queued",
        "request_summary": "",
        "response_excerpt": "",
        "detail": "",
        "issues": [],
        "latency_ms": 0,
    }


def _outbox_row(attempt_id: int, now) -> dict:
    return {
        "kind": "deliver",
        "ref_id": str(attempt_id),
        "job_id": deliver_job_id(attempt_id),
        "created_at": now,
    }


def _receive_params(client, message_id, status, key, conn, message_type, decoded, extra) -> dict:
    return audit.pending_params(
        actor=client.username,
        action="message.receive",
        subject_type="message",
        subject_id=message_id,
        to_state=status,
        details={
            "idempotency_key": key,
            "connection": conn.name,
            "message_type": message_type,
            "payload_sha256": decoded.sha256,
            "encoding": decoded.encoding,
            "decoding_rule": decoded.rule,
            **extra,
        },
    )


# --- statements, built once per process -----------------------------------------------------------
# Building a SQLAlchemy statement costs more CPU than its round trip: each insert is built once
# with bound parameters named "<part>__<column>", and on PostgreSQL each combination of parts
# once more as one statement of data-modifying CTEs (foreign keys are checked at its end).

_PARTS = {
    "message": (_MESSAGES, None),
    "payload": (
        _PAYLOADS,
        (
            "message_id",
            "version",
            "raw",
            "text",
            "encoding",
            "sha256",
            "created_by_id",
            "reason",
            "created_at",
        ),
    ),
    "attempt": (
        _ATTEMPTS,
        (
            "message_id",
            "payload_version_id",
            "trigger",
            "started_at",
            "outcome",
            "request_summary",
            "response_excerpt",
            "detail",
            "issues",
            "latency_ms",
        ),
    ),
    "outbox": (_OUTBOX, ("kind", "ref_id", "job_id", "created_at")),
    "identifier": (_IDENTIFIERS, ("message_id", "kind", "value")),
}
_MESSAGE_COLUMNS = (
    "id",
    "client_id",
    "idempotency_key",
    "request_fingerprint",
    "response_json",
    "connection_id",
    "message_type",
    "content_type",
    "patient_ref",
    "clinical_risk",
    "status",
    "delivery_system",
    "control_id",
    "current_payload_id",
    "created_at",
    "updated_at",
)
_statements: dict = {}


def _bound(part: str, table: sa.Table, names) -> dict:
    return {name: sa.bindparam(f"{part}__{name}", type_=table.c[name].type) for name in names}


def _identifier_rows():
    """PostgreSQL: a message's identifiers as rows (kind, value) of the one JSON parameter
    `identifiers__rows` (a list of {kind, value}; `_identifiers_json`)."""
    return (
        sa.func.json_to_recordset(
            sa.cast(sa.bindparam("identifiers__rows", type_=sa.String), postgresql.JSON)
        )
        .table_valued(sa.column("kind", sa.Text), sa.column("value", sa.Text))
        .render_derived(name="identifier_rows", with_types=True)
    )


def _identifiers_json(identifiers) -> str:
    return json.dumps([{"kind": kind, "value": value} for kind, value in identifiers])


def _build(part: str):
    if part == "event":
        return audit.PENDING_INSERT
    if part == "identifiers":
        # PostgreSQL: every identifier of the message from one JSON array of {kind, value} — one
        # parameter whatever the count (the driver dumps two text arrays element by element in
        # Python: a twentieth of the request's CPU).
        rows = _identifier_rows()
        return sa.insert(_IDENTIFIERS).from_select(
            ["message_id", "kind", "value"],
            sa.select(sa.bindparam("identifiers__message_id", type_=sa.String), rows.c.kind, rows.c.value),
        )
    if part == "message":
        return sa.insert(_MESSAGES).values(_bound(part, _MESSAGES, _MESSAGE_COLUMNS))
    with_id = part.endswith("_with_id")
    table, names = _PARTS[part.removesuffix("_with_id")]
    return sa.insert(table).values(_bound(part, table, (("id",) if with_id else ()) + names))


def _statement(key):
    statement = _statements.get(key)
    if statement is None:
        if isinstance(key, tuple):  # PostgreSQL: the parts as one statement
            ctes = [_statement(part).cte(f"w{n}") for n, part in enumerate(key) if part != "event"]
            if "event" in key:
                statement = sa.select(_statement("event").cte("audit_event").c.seq).add_cte(*ctes)
            else:
                statement = sa.select(sa.literal(1)).add_cte(*ctes)
        else:
            statement = _build(key)
        _statements[key] = statement
    return statement


def _params(part: str, values: dict) -> dict:
    return values if part == "event" else {f"{part}__{name}": value for name, value in values.items()}


def _execute(session: so.Session, part: tuple[str, dict]):
    name, values = part
    session.flush()  # as in _run: what the session holds keeps its order
    return session.connection().execute(_statement(name), _params(name, values))


_compiled: dict = {}


def _run(session: so.Session, statement, params: dict):
    """Run one of intake's prebuilt Core statements in the session's transaction and return its
    single row. PostgreSQL: as the SQL it compiles to (compiled once per process), on the
    transaction's own driver connection, prepared — SQLAlchemy's per-execution work (parameter
    processing of ~55 binds, execution context, result metadata) was a fifth of the request's
    CPU. Errors surface as SQLAlchemy's (IntegrityError for a racing duplicate key). SQLite: as
    Core runs it."""
    # What the session holds goes first, as the ORM's execute would autoflush it: an audit event
    # recorded earlier in this transaction (a batch import) must take its place in the chain
    # before this message's.
    session.flush()
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        return conn.execute(statement, params).one()
    return _run_on_driver(conn.connection.driver_connection, conn.dialect, statement, params)


def _run_on_driver(driver, dialect, statement, params: dict, row_factory=namedtuple_row):
    """`statement` (compiled once per process) with `params` on a psycopg connection, prepared:
    its first row (None if it returned none)."""
    found = _compiled.get(id(statement))
    if found is None:
        compiled = statement.compile(dialect=dialect)
        # The type processing SQLAlchemy applies to each bind (JSON serialisation and the like).
        processors = {}
        for key, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors[key] = process
        # Binds with fixed values (a function's literal arguments) as SQLAlchemy would send them.
        fixed = {key: value for key, value in compiled.construct_params(params).items() if key not in params}
        # (the statement itself is kept so that its id is never reused by another object)
        found = _compiled[id(statement)] = (compiled.string, processors, fixed, statement)
    sql, processors, fixed, _ = found
    values = dict(fixed)
    for key, value in params.items():
        process = processors.get(key)
        values[key] = value if process is None else process(value)
    try:
        with driver.cursor(row_factory=row_factory) as cursor:
            cursor.execute(sql, values, prepare=True)
            return cursor.fetchone()
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg.Error, hide_parameters=True) from exc


def _execute_parts(session: so.Session, parts: list[tuple[str, dict]]) -> None:
    """Run the inserts: on PostgreSQL as one statement, elsewhere one after another. The audit
    event's seq, if it is among them, is handed to the sealer."""
    if session.get_bind().dialect.name == "postgresql" and len(parts) > 1:
        params = {}
        for name, values in parts:
            params.update(_params(name, values))
        row = _run(session, _statement(tuple(name for name, _ in parts)), params)
        if any(name == "event" for name, _ in parts):
            audit.note_recorded(session, [row[0]])
        return
    for part in parts:
        result = _execute(session, part)
        if part[0] == "event":
            audit.note_recorded(session, [result.scalar_one()])


# --- one round trip: the API's intake of a message that goes out (PostgreSQL) ---------------------
# The two-step path looks up two things before it writes: whether the key is taken, and the named
# connection's settings (to decode and check the payload). The first can be asked by the insert
# itself (ON CONFLICT DO NOTHING); the second is kept per process from the last lookup. A request
# for a connection a lookup has read is decoded and checked against that copy and stored by one
# statement in its own transaction (autocommit): no BEGIN, lookup or COMMIT round trips, no ORM
# session — at ~600 requests/s, 0.85 against 1.5 ms of the process's CPU each. The statement
# writes nothing unless the connection's settings are still those of the copy (a digest of its
# row without the runtime state) and the key is new — in every other case (a stored or racing
# key, changed settings, a refusal, a repair proposal, drift to count, an invalid request) it is
# not used or writes nothing, and the two-step path answers exactly as it always has.

_KNOWN_CONNECTIONS_MAX = 1024
_known_connections: dict[tuple, tuple[_ConnectionRow, str]] = {}  # (pool, name) -> (row, digest)


def _remember_connection(pool, name: str, connection: _ConnectionRow, guard: str | None) -> None:
    if guard is None:
        return
    if len(_known_connections) >= _KNOWN_CONNECTIONS_MAX and (pool, name) not in _known_connections:
        _known_connections.clear()
    _known_connections[(pool, name)] = (connection, guard)


def _one_statement_intake() -> sa.Select:
    def bound(part: str, table: sa.Table, names) -> list:
        return list(_bound(part, table, names).values())

    settings_unchanged = sa.exists().where(
        _CONNECTIONS.c.id == sa.bindparam("connection_id", type_=sa.Integer),
        sa.bindparam("settings_guard", type_=sa.String) == _SETTINGS_GUARD,
    )
    ids = (
        sa.select(
            sa.func.nextval("payload_versions_id_seq").label("payload_id"),
            sa.func.nextval("attempts_id_seq").label("attempt_id"),
            # Read before the insert below can wait on a racing uncommitted row with this key:
            # it waits at most 10 s (then 409), as in the two-step path.
            sa.func.set_config("lock_timeout", "10s", True).label("lock_bound"),
        )
        .where(settings_unchanged)
        .cte("ids")
    )
    message_columns = [name for name in _MESSAGE_COLUMNS if name != "current_payload_id"]
    message = (
        postgresql.insert(_MESSAGES)
        .from_select(
            [*message_columns, "current_payload_id"],
            sa.select(*bound("message", _MESSAGES, message_columns), ids.c.payload_id),
        )
        .on_conflict_do_nothing(constraint="uq_messages_client_key")
        .returning(_MESSAGES.c.id)
        .cte("m")
    )
    payload_columns = _PARTS["payload"][1]
    payload = sa.insert(_PAYLOADS).from_select(
        ["id", *payload_columns],
        sa.select(ids.c.payload_id, *bound("payload", _PAYLOADS, payload_columns)).select_from(message),
    )
    rows = _identifier_rows()
    identifiers = sa.insert(_IDENTIFIERS).from_select(
        ["message_id", "kind", "value"], sa.select(message.c.id, rows.c.kind, rows.c.value)
    )
    attempt_columns = [name for name in _PARTS["attempt"][1] if name != "payload_version_id"]
    attempt = sa.insert(_ATTEMPTS).from_select(
        ["id", "payload_version_id", *attempt_columns],
        sa.select(
            ids.c.attempt_id, ids.c.payload_id, *bound("attempt", _ATTEMPTS, attempt_columns)
        ).select_from(message),
    )
    attempt_ref = sa.cast(ids.c.attempt_id, sa.String)
    outbox = sa.insert(_OUTBOX).from_select(
        ["kind", "ref_id", "job_id", "created_at"],
        sa.select(
            sa.bindparam("outbox__kind", type_=sa.String),
            attempt_ref,
            sa.literal(DELIVER_JOB_PREFIX, sa.String) + attempt_ref,  # deliver_job_id(attempt_id)
            sa.bindparam("outbox__created_at", type_=_OUTBOX.c.created_at.type),
        ).select_from(message),
    )
    event_columns = list(audit.PENDING_COLUMNS)
    event = (
        sa.insert(audit.PENDING_TABLE)
        .from_select(
            event_columns,
            sa.select(*bound("audit_event", audit.PENDING_TABLE, event_columns)).select_from(message),
        )
        .returning(audit.PENDING_TABLE.c.seq)
        .cte("audit_event")
    )
    writes = [part.cte(f"w{n}") for n, part in enumerate((payload, identifiers, attempt, outbox))]
    return sa.select(event.c.seq, ids.c.attempt_id).add_cte(message, *writes)


_ONE_STATEMENT = _one_statement_intake()


def submit_message_in_one_statement(
    factory: so.sessionmaker, client: User, key: str, body: dict, *, seal_in_background: bool
) -> IntakeResult | None:
    """`submit_message` for the API in one round trip when it can be (see above): its answer,
    or None when the two-step path must answer (nothing was written). PostgreSQL only."""
    engine = factory.kw["bind"]
    name = body.get("connection")
    if engine.dialect.name != "postgresql" or not isinstance(name, str):
        return None
    known = _known_connections.get((engine.pool, name))
    if known is None:
        return None
    conn, guard = known
    try:
        _, message_type, raw = _validated(body, _Lookup(None, conn))
        patient_ref, identifiers, decoded = _decode(body, conn, message_type, raw)
    except (Invalid, NotFound):  # answered after the lookup (a stored key is replayed first)
        return None
    if (
        _refusal(conn, message_type, decoded) is not None
        or decoded.repair is not None
        or any(observation.kind in DRIFT_KINDS for observation in decoded.observations)
    ):
        return None
    now = utcnow()
    message_id = str(uuid.uuid4())
    params = {"connection_id": conn.id, "settings_guard": guard}
    message_row = _message_row(
        message_id,
        client,
        key,
        request_fingerprint(body),
        body,
        conn,
        message_type,
        patient_ref,
        "queued",
        now,
    )
    # The statement draws the payload's and the attempt's ids, and names the outbox row by the latter.
    attempt_row = _attempt_row(message_id, None, now)
    del attempt_row["payload_version_id"]
    outbox_row = {k: v for k, v in _outbox_row(0, now).items() if k not in ("ref_id", "job_id")}
    for part, values in (
        ("message", message_row),
        ("payload", _payload_row(message_id, decoded, client, now)),
        ("attempt", attempt_row),
        ("outbox", outbox_row),
    ):
        params.update(_params(part, values))
    params["identifiers__rows"] = _identifiers_json(identifiers)
    params.update(_receive_params(client, message_id, "queued", key, conn, message_type, decoded, {}))
    row = _run_autocommit(engine, _ONE_STATEMENT, params)
    if row is None:  # the key is taken, or the connection's settings changed
        return None
    audit.seal_committed(factory, [row[0]], in_background=seal_in_background)
    return IntakeResult(202, dict(message_row["response_json"]))


def _run_autocommit(engine: sa.Engine, statement, params: dict):
    """One statement as a transaction of its own, on a pooled connection: its first row."""
    pooled = engine.raw_connection()
    driver = pooled.driver_connection
    try:
        driver.autocommit = True
        try:
            return _run_on_driver(driver, engine.dialect, statement, params, row_factory=tuple_row)
        except sa.exc.DBAPIError:
            if driver.broken or driver.closed:  # not back into the pool
                pooled.invalidate()
            raise
        finally:
            if not driver.closed:
                driver.autocommit = False
    finally:
        pooled.close()


def submit_message(session: so.Session, client: User, key: str, body: dict) -> IntakeResult:
    """Accept one outbound message. Raises Invalid/NotFound for requests we cannot store."""
    fingerprint = request_fingerprint(body)
    found = _lookup(session, client, key, body)
    if found.existing is not None:
        return replay_response(found.existing, fingerprint)
    conn, message_type, raw = _validated(body, found)
    fields = _decode(body, conn, message_type, raw)
    refusal = _refusal(conn, message_type, fields[2])
    if refusal is None:
        stored = _store(
            session,
            client,
            key,
            fingerprint,
            body,
            conn,
            message_type,
            found,
            fields,
            status="queued",
            audit_extra={},
        )
        return IntakeResult(202, {"id": stored.id, "idempotency_key": key, "status": "queued"})
    category, detail = refusal
    stored = _store(
        session,
        client,
        key,
        fingerprint,
        body,
        conn,
        message_type,
        found,
        fields,
        status="exception",
        audit_extra={},
    )
    message = session.get(Message, stored.id)
    exception = open_exception(session, message, category, detail, payload_version_id=stored.payload_id)
    message.response_json = {
        "id": stored.id,
        "idempotency_key": key,
        "status": "exception",
        "exception_id": exception.id,
        "category": exception.category,
    }
    _audit_receive(session, client, stored, key, conn, {})
    session.flush()  # a later lookup in this transaction (a batch import) reads the final response
    return IntakeResult(202, dict(message.response_json))


def _audit_receive(session, client: User, stored: _Stored, key: str, conn, extra: dict) -> None:
    params = _receive_params(
        client, stored.id, "exception", key, conn, stored.message_type, stored.decoded, extra
    )
    _execute_parts(session, [("event", params)])


def report_exception(session: so.Session, client: User, key: str, body: dict) -> IntakeResult:
    """An interface engine reports a message that failed on its side (SPEC 9.3 POST /exceptions).

    Stored byte-for-byte like any intake and put straight into a human queue — never sent from
    here. Categorized from the payload (unreadable: data_shape) and the engine's error text; a
    replay later goes out through our adapter for that connection, like any other."""
    fingerprint = request_fingerprint(body)
    found = _lookup(session, client, key, body)
    if found.existing is not None:
        return replay_response(found.existing, fingerprint)
    conn, message_type, raw = _validated(body, found, require_error=True)
    fields = _decode(body, conn, message_type, raw)
    decoded = fields[2]
    stored = _store(
        session,
        client,
        key,
        fingerprint,
        body,
        conn,
        message_type,
        found,
        fields,
        status="exception",
        audit_extra={"reported_error": True},
    )
    # The engine's words, made storable: no NUL (PostgreSQL text), no lone surrogates.
    error = body["error"].strip()[:2000].encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    if decoded.problem:
        category, may_have_applied = Category.DATA_SHAPE, False
        detail = f"{decoded.problem_kind}: {decoded.problem} — reported by {client.username}: {error}"
    else:
        category, may_have_applied = categorize_reported_error(error)
        detail = f"reported by {client.username}: {error}"
        if decoded.code_set_problem:
            # The engine's words say whether the EHR may have applied it, and that stands. Only a
            # plain rejection becomes code_set: the payload carries a code the EHR does not read.
            if category is Category.EHR_REJECTED:
                category = Category.CODE_SET
            detail = f"{detail} — code set: {decoded.code_set_problem}"
    message = session.get(Message, stored.id)
    exception = open_exception(
        session,
        message,
        category,
        detail,
        payload_version_id=stored.payload_id,
        actor=client.username,
        may_have_applied=may_have_applied,
    )
    message.response_json = {"id": stored.id, "exception_id": exception.id, "category": exception.category}
    _audit_receive(session, client, stored, key, conn, {"reported_error": True})
    session.flush()
    return IntakeResult(202, dict(message.response_json))


def _control_id(key: str, client: User) -> str:
    return control_id_for(f"{client.id}:{key}")


def _refusal(conn, message_type: str, decoded) -> tuple[Category, str] | None:
    """Why this message cannot be sent as it is, or None: what is wrong with the payload (its shape,
    then its codes) before where it is going (the connection's configuration)."""
    if decoded.problem:
        return Category.DATA_SHAPE, f"{decoded.problem_kind}: {decoded.problem}"
    if decoded.code_set_problem:
        return Category.CODE_SET, decoded.code_set_problem
    refusal = routing_refusal(connections.settings_for(conn), message_type)
    return (Category.CONFIG, refusal) if refusal else None
