"""Intake (POST /api/v1/messages): store first, then deliver through the outbox.

The message, its idempotency key, its first payload version, its outbox row and
its audit event commit in one transaction.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import Attempt, Message, MessageIdentifier, OutboxEntry, PayloadVersion, User
from app.domain.categorize import categorize_reported_error
from app.domain.delivery import Category, clinical_risk, control_id_for, routing_refusal
from app.domain.errors import Invalid, NotFound
from app.domain.idempotency import request_fingerprint
from app.domain.identifiers import extract_identifiers
from app.domain.payloads import (
    CONTENT_TYPES,
    PROPOSED_REPAIR,
    decode_payload,
    encode_text,
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


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database can store it as text
        return False
    return True


# The widest indexed text a message keeps beside its payload (Message.patient_ref,
# MessageIdentifier.value).
STORABLE_LENGTH = 200


def _storable(value: str) -> bool:
    return len(value) <= STORABLE_LENGTH and "\x00" not in value and _is_unicode(value)


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


def _validated(session: so.Session, client: User, body: dict, *, require_error: bool = False):
    """The connection, message type and raw bytes of a request, or Invalid/NotFound."""
    for name in ("connection", "message_type", "content_type", *(("error",) if require_error else ())):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise Invalid(f"{name} is required", code="invalid_body")
        if name != "error" and not _is_unicode(body[name]):
            raise Invalid(f"{name} must be valid Unicode text", code="invalid_body")
    if body["content_type"] not in CONTENT_TYPES:
        raise Invalid(f"content_type must be one of {', '.join(CONTENT_TYPES)}", code="invalid_body")
    raw = _raw_payload(body)
    conn = connections.by_name(session, body["connection"])
    if conn is None:
        raise NotFound(f"connection {body['connection']!r} not found", code="unknown_connection")
    return conn, body["message_type"].strip()[:40], raw


def _store(
    session: so.Session, client: User, key: str, fingerprint: str, body: dict, conn, message_type, raw
):
    """The message and its first payload version, stored byte-for-byte whatever they hold."""
    now = utcnow()
    decoded = decode_payload(
        raw,
        body["content_type"],
        message_type,
        diagnosis_code_system=connections.settings_for(conn).diagnosis_code_system,
    )
    patient_ref, identifiers, decoded = _indexed_fields(body, decoded)
    message = Message(
        id=str(uuid.uuid4()),
        client_id=client.id,
        idempotency_key=key,
        request_fingerprint=fingerprint,
        response_json={},
        connection_id=conn.id,
        message_type=message_type,
        content_type=body["content_type"],
        patient_ref=patient_ref,
        clinical_risk=clinical_risk(message_type),
        status="queued",
        delivery_system=DELIVERY_SYSTEM_PREFIX + client.username,
        control_id=_control_id(key, client),
        created_at=now,
        updated_at=now,
    )
    payload = PayloadVersion(
        message_id=message.id,
        version=1,
        raw=decoded.raw,
        text=decoded.text,
        encoding=decoded.encoding,
        sha256=decoded.sha256,
        created_by_id=client.id,
        reason="intake",
        created_at=now,
    )
    session.add_all([message, payload])
    session.flush()  # the unique (client, key) constraint fires here for a racing duplicate
    message.current_payload_id = payload.id
    session.add_all(
        MessageIdentifier(message_id=message.id, kind=kind, value=value) for kind, value in identifiers
    )
    drift.record(session, conn.id, message.id, decoded.observations, now)
    if decoded.repair is not None:
        # Mojibake: the repaired text is kept as a *proposal* (version 2, not current). A reviewer
        # finds it in the correction editor; it is sent only as an approved corrected replay.
        repaired = encode_text(decoded.repair.repaired_text, body["content_type"])
        session.add(
            PayloadVersion(
                message_id=message.id,
                version=2,
                raw=repaired,
                text=decoded.repair.repaired_text,
                encoding=decoded.encoding,
                sha256=sha256_hex(repaired),
                created_by_id=None,
                reason=f"{PROPOSED_REPAIR}: mojibake at {decoded.repair.where} ({decoded.repair.explanation})",
                created_at=now,
            )
        )
    return message, payload, decoded


def _audit_receive(session, client: User, message: Message, key: str, conn, decoded, **extra) -> None:
    audit.record(
        session,
        actor=client.username,
        action="message.receive",
        subject_type="message",
        subject_id=message.id,
        to_state=message.status,
        details={
            "idempotency_key": key,
            "connection": conn.name,
            "message_type": message.message_type,
            "payload_sha256": decoded.sha256,
            "encoding": decoded.encoding,
            "decoding_rule": decoded.rule,
            **extra,
        },
    )


def submit_message(session: so.Session, client: User, key: str, body: dict) -> IntakeResult:
    """Accept one outbound message. Raises Invalid/NotFound for requests we cannot store."""
    fingerprint = request_fingerprint(body)
    existing = find_existing(session, client, key)
    if existing is not None:
        return replay_response(existing, fingerprint)
    conn, message_type, raw = _validated(session, client, body)
    message, payload, decoded = _store(session, client, key, fingerprint, body, conn, message_type, raw)
    message.response_json = {"id": message.id, "idempotency_key": key, "status": message.status}

    refusal = _refusal(conn, message_type, decoded)
    if refusal is not None:
        category, detail = refusal
        message.status = "exception"
        exception = open_exception(session, message, category, detail, payload_version_id=payload.id)
        message.response_json = {
            **message.response_json,
            "status": message.status,
            "exception_id": exception.id,
            "category": exception.category,
        }
    else:
        now = utcnow()
        attempt = Attempt(
            message_id=message.id,
            payload_version_id=payload.id,
            trigger="intake",
            started_at=now,
            outcome="queued",
        )
        session.add(attempt)
        session.flush()
        session.add(
            OutboxEntry(
                kind="deliver", ref_id=str(attempt.id), job_id=f"deliver-{attempt.id}", created_at=now
            )
        )
    _audit_receive(session, client, message, key, conn, decoded)
    return IntakeResult(202, dict(message.response_json))


def report_exception(session: so.Session, client: User, key: str, body: dict) -> IntakeResult:
    """An interface engine reports a message that failed on its side (SPEC 9.3 POST /exceptions).

    Stored byte-for-byte like any intake and put straight into a human queue — never sent from
    here. Categorized from the payload (unreadable: data_shape) and the engine's error text; a
    replay later goes out through our adapter for that connection, like any other."""
    fingerprint = request_fingerprint(body)
    existing = find_existing(session, client, key)
    if existing is not None:
        return replay_response(existing, fingerprint)
    conn, message_type, raw = _validated(session, client, body, require_error=True)
    message, payload, decoded = _store(session, client, key, fingerprint, body, conn, message_type, raw)
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
    message.status = "exception"
    exception = open_exception(
        session,
        message,
        category,
        detail,
        payload_version_id=payload.id,
        actor=client.username,
        may_have_applied=may_have_applied,
    )
    message.response_json = {"id": message.id, "exception_id": exception.id, "category": exception.category}
    _audit_receive(session, client, message, key, conn, decoded, reported_error=True)
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
