"""The patient and order identifiers a message carries, for search (issue 5): a reviewer types
`Patient/123456`, an MRN or an order number and finds the exceptions about it.

FHIR: the resource's own `identifier` values, the subject / patient reference (and its id), and a
Patient's id. HL7 v2: PID-3 (every repetition's ID), ORC-2 / ORC-3 and OBR-2 / OBR-3 (placer and
filler order numbers). Never raises: what cannot be read yields nothing.
"""

from __future__ import annotations

import json
import re

from .payloads import FHIR_JSON, HL7_ER7

MAX_IDENTIFIERS = 50
MAX_LENGTH = 200

# (segment, field number) → kind
_HL7_FIELDS = {
    ("PID", 3): "patient_id",
    ("ORC", 2): "placer_order",
    ("ORC", 3): "filler_order",
    ("OBR", 2): "placer_order",
    ("OBR", 3): "filler_order",
}


def extract_identifiers(content_type: str, text: str, document: dict | None = None) -> list[tuple[str, str]]:
    """(kind, value) pairs, de-duplicated, at most MAX_IDENTIFIERS, values at most MAX_LENGTH.
    `document`: the already parsed FHIR resource, if the caller has it."""
    try:
        if content_type == FHIR_JSON:
            found = _fhir(document if document is not None else json.loads(text))
        else:
            found = _hl7(text) if content_type == HL7_ER7 else []
    except (ValueError, RecursionError, TypeError, AttributeError, IndexError):
        found = []
    out: list[tuple[str, str]] = []
    for kind, value in found:
        value = value.strip()
        if value and len(value) <= MAX_LENGTH and "\x00" not in value and (kind, value) not in out:
            out.append((kind, value))
        if len(out) >= MAX_IDENTIFIERS:
            break
    return out


def search_values(query: str) -> list[str]:
    """What a typed query may be stored as: `Patient/123456` is also `123456`."""
    query = query.strip()
    values = [query]
    if "/" in query:
        tail = query.rsplit("/", 1)[1]
        if tail:
            values.append(tail)
    return values


def _fhir(doc) -> list[tuple[str, str]]:
    if not isinstance(doc, dict):
        return []
    found: list[tuple[str, str]] = []
    for ident in doc.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            found.append(("identifier", ident["value"]))
    if doc.get("resourceType") == "Patient" and isinstance(doc.get("id"), str):
        found += [("patient", f"Patient/{doc['id']}"), ("patient", doc["id"])]
    for key in ("subject", "patient"):
        ref = doc.get(key)
        if isinstance(ref, dict):
            if isinstance(ref.get("reference"), str):
                reference = ref["reference"]
                found.append(("patient", reference))
                if "/" in reference:
                    found.append(("patient", reference.rsplit("/", 1)[1]))
            ident = ref.get("identifier")
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                found.append(("patient_id", ident["value"]))
    return found


def _hl7(text: str) -> list[tuple[str, str]]:
    text = text.lstrip("\x0b\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        return []
    field_sep = text[3]
    encoding = text[4:8]
    component, repetition = encoding[0], encoding[1] if len(encoding) > 1 else "~"
    found: list[tuple[str, str]] = []
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split(field_sep)
        name = fields[0]
        for (seg, number), kind in _HL7_FIELDS.items():
            if name == seg and len(fields) > number:
                for rep in fields[number].split(repetition):
                    value = rep.split(component)[0]
                    if value:
                        found.append((kind, value))
    return found
