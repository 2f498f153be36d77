"""Defensive decoding and parsing of inbound payloads (SPEC 2 'intake never drops data')."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

FHIR_JSON = "application/fhir+json"
HL7_ER7 = "x-application/hl7-v2+er7"
CONTENT_TYPES = (FHIR_JSON, HL7_ER7)


@dataclass(frozen=True)
class DecodedPayload:
    raw: bytes
    text: str  # best-effort text for display and editing
    encoding: str  # how `text` was obtained from `raw`
    sha256: str
    problem: str | None = None  # set when the payload is unusable: becomes a data_shape exception
    problem_kind: str | None = None  # decode | parse | shape


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def decode_bytes(raw: bytes, content_type: str) -> tuple[str, str, str | None]:
    """Return (text, encoding, problem). FHIR JSON must be UTF-8 (RFC 8259); anything else
    is kept, shown via cp1252/latin-1 fallback, and flagged."""
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):
            text = text[1:]
            return text, "utf-8-sig", None
        return text, "utf-8", None
    except UnicodeDecodeError as exc:
        if content_type == HL7_ER7:
            try:
                return raw.decode("cp1252"), "cp1252", None
            except UnicodeDecodeError:
                pass
        where = f"byte {exc.start}"
        return raw.decode("latin-1"), "latin-1 (fallback)", f"payload is not valid UTF-8 ({where})"


def parse_fhir_json(text: str) -> tuple[dict | None, str | None]:
    """The JSON object of a FHIR resource, or the reason it is not one."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return None, f"payload is not JSON: {exc}"
    except RecursionError:
        return None, "payload is JSON nested too deeply to parse"
    if not isinstance(doc, dict):
        return None, "payload is JSON but not an object"
    if not isinstance(doc.get("resourceType"), str):
        return None, "payload has no resourceType"
    return doc, None


def decode_payload(raw: bytes, content_type: str, message_type: str) -> DecodedPayload:
    """Decode and shape-check a payload; never raises for bad content."""
    text, encoding, problem = decode_bytes(raw, content_type)
    kind = "decode" if problem else None
    if "\x00" in text:
        # Databases cannot hold NUL in text columns; the raw bytes keep it, the text shows U+FFFD.
        text = text.replace("\x00", "\ufffd")
        problem, kind = problem or "payload contains NUL characters", kind or "decode"
    if problem is None and content_type == FHIR_JSON:
        doc, problem = parse_fhir_json(text)
        kind = "parse" if problem else None
        if doc is not None and doc["resourceType"] != message_type:
            problem = f"resourceType {doc['resourceType']!r} does not match message_type {message_type!r}"
            kind = "shape"
    elif problem is None and content_type == HL7_ER7 and not text.lstrip().startswith("MSH"):
        problem, kind = "HL7 v2 payload does not start with an MSH segment", "parse"
    return DecodedPayload(raw, text, encoding, sha256_hex(raw), problem, kind)


def patient_reference(content_type: str, text: str) -> str | None:
    """The patient a message is about, for masking in lists (FHIR subject/patient)."""
    if content_type != FHIR_JSON:
        return None
    doc, problem = parse_fhir_json(text)
    if problem or doc is None:
        return None
    if doc.get("resourceType") == "Patient":
        return f"Patient/{doc.get('id', '?')}"
    for key in ("subject", "patient"):
        ref = doc.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return ref["reference"][:200]
    return None
