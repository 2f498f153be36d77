"""Defensive decoding and parsing of inbound payloads (SPEC 2 'intake never drops data')."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

FHIR_JSON = "application/fhir+json"
HL7_ER7 = "x-application/hl7-v2+er7"
CONTENT_TYPES = (FHIR_JSON, HL7_ER7)
PROPOSED_REPAIR = "proposed repair"  # payload_versions.reason prefix of a repair nobody applied yet


# Kinds of data-shape observation counted per connection over time ("drift"): the first of a kind
# on a connection is flagged on the dashboard. An observation is not by itself a refusal.
DRIFT_KINDS = (
    "decode_fallback",  # not UTF-8 and no MSH-18: decoded by a fallback rule
    "mojibake",  # double-encoded text (UTF-8 read as cp1252 upstream)
    "unknown_segment",  # an HL7 v2 segment we do not know
    "z_segment",  # a custom Z-segment
    "missing_required_field",  # an empty field the message type requires
    "field_too_long",  # an HL7 field over its v2.5.1 length
    "bad_escape",  # an HL7 escape sequence that is not closed or not known
    "unknown_code_system",  # a coding system we do not recognise, or the other ICD revision
    "new_fhir_element",  # an element the FHIR resource does not define
    "capability_change",  # the EHR's CapabilityStatement changed
)


@dataclass(frozen=True)
class Observation:
    """Something about a payload worth counting per connection (one of DRIFT_KINDS)."""

    kind: str
    where: str = ""  # "PID-5", "ZPD", "Condition.code.coding[0]"
    detail: str = ""


@dataclass(frozen=True)
class DecodedPayload:
    raw: bytes
    text: str  # best-effort text for display and editing
    encoding: str  # how `text` was obtained from `raw`
    sha256: str
    problem: str | None = None  # set when the payload is unusable: becomes a data_shape exception
    problem_kind: str | None = None  # decode | parse | shape | mojibake
    rule: str = ""  # which decoding rule fired (TextDecoding.rule)
    repair: Repair | None = None  # a proposed repair, never applied by itself
    document: dict | None = None  # the FHIR resource, parsed once for everything intake reads from it
    observations: tuple[Observation, ...] = ()  # drift: counted per connection, never a refusal alone
    code_set_problem: str | None = None  # the other ICD revision than the connection expects (code_set)


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# HL7 table 0211 (MSH-18 character sets) → Python codecs. Unknown values fall back to the rules.
MSH18_CODECS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso-8859-1",
    "ISO IR100": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",
    "BIG-5": "big5",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR14": "shift_jis",
    "WINDOWS-1252": "cp1252",  # not in table 0211, but sent by real engines
    "CP1252": "cp1252",
}


@dataclass(frozen=True)
class TextDecoding:
    """How a payload's bytes became text, and the rule that fired (shown with the payload)."""

    text: str
    encoding: str  # the codec used
    rule: str  # e.g. "MSH-18 8859/1", "strict UTF-8", "Windows-1252: not UTF-8 at byte 41"
    problem: str | None = None  # the bytes cannot be trusted as text (data_shape)


def declared_charset(raw: bytes) -> str | None:
    """MSH-18 as declared in an HL7 v2 message (its first repetition), read from the bytes — the
    MSH segment is ASCII whatever the rest is. None when absent or the message has no MSH."""
    start = raw.lstrip(b"\x0b\r\n ")
    if start.startswith(b"\xef\xbb\xbf"):
        start = start[3:]
    if not start.startswith(b"MSH") or len(start) < 8:
        return None
    separator = start[3:4]
    segment = re.split(rb"[\r\n]", start, maxsplit=1)[0]
    fields = segment.split(separator)
    if len(fields) <= 17:
        return None
    repetition = fields[1][1:2] or b"~"  # MSH-2: component, repetition, escape, subcomponent
    value = fields[17].split(repetition)[0].strip()
    try:
        return value.decode("ascii").upper() or None
    except UnicodeDecodeError:
        return None


def decode_text(raw: bytes, content_type: str) -> TextDecoding:
    """Bytes → text by one rule, recorded: MSH-18 when an HL7 message declares it, else strict
    UTF-8, else Windows-1252 (never Latin-1 first: cp1252's en dash and curly quotes are what
    legacy systems send), else Latin-1 as a last resort. FHIR JSON must be UTF-8 (RFC 8259):
    anything else is shown through the same fallbacks and flagged as a problem."""
    notes = []
    declared = declared_charset(raw) if content_type == HL7_ER7 else None
    if declared:
        codec = MSH18_CODECS.get(declared)
        if codec is None:
            notes.append(f"MSH-18 {declared!r} is not a known character set")
        else:
            try:
                return TextDecoding(raw.decode(codec), codec, f"MSH-18 {declared}")
            except UnicodeDecodeError as exc:
                notes.append(f"MSH-18 declares {declared} but byte {exc.start} is not {declared}")
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):
            return TextDecoding(text[1:], "utf-8-sig", "; ".join([*notes, "strict UTF-8 (BOM)"]))
        return TextDecoding(text, "utf-8", "; ".join([*notes, "strict UTF-8"]))
    except UnicodeDecodeError as exc:
        not_utf8 = f"not UTF-8 at byte {exc.start}"
    problem = (
        f"payload is not valid UTF-8 ({not_utf8.removeprefix('not UTF-8 at ')})"
        if (content_type == FHIR_JSON)
        else None
    )
    try:
        return TextDecoding(
            raw.decode("cp1252"), "cp1252", "; ".join([*notes, f"Windows-1252: {not_utf8}"]), problem
        )
    except UnicodeDecodeError as exc:
        rule = f"Latin-1, last resort: {not_utf8}, and byte {exc.start} is not Windows-1252"
        return TextDecoding(
            raw.decode("latin-1"), "latin-1", "; ".join([*notes, rule]), problem or f"payload is {rule}"
        )


@dataclass(frozen=True)
class Repair:
    """A proposed repair of mojibake (text decoded with the wrong character set somewhere upstream,
    e.g. UTF-8 read as Windows-1252: `MÃ¼ller`). Never applied by itself to clinical content: it
    is offered as a correction that goes through the normal four-eyes path."""

    kind: str  # mojibake
    where: str  # "PID-5" for HL7, "line 3" for other text
    explanation: str  # the steps that undo it, e.g. "encode latin-1, decode utf-8"
    repaired_text: str


def encode_text(text: str, content_type: str) -> bytes:
    """Bytes for text a person typed (a correction, a proposed repair): in the character set an
    HL7 message declares in MSH-18 when the text fits it, else UTF-8."""
    if content_type == HL7_ER7:
        codec = MSH18_CODECS.get(declared_charset(text[:2000].encode("utf-8", "replace")) or "")
        if codec:
            try:
                return text.encode(codec)
            except (UnicodeEncodeError, LookupError):
                pass
    return text.encode("utf-8")


def is_unicode(text: str) -> bool:
    """Whether `text` has a UTF-8 form (a lone surrogate from a JSON \\u escape has none: no
    database can store it as text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def detect_mojibake(text: str, content_type: str, document: dict | None = None) -> Repair | None:
    """ftfy's verdict on the whole text, located at the first field (or line) it would change.
    `document`: the already parsed FHIR resource, if the caller has it."""
    if text.isascii() and "\\u" not in text:
        return None  # nothing outside ASCII, not even escaped: nothing can be mis-decoded
    import ftfy

    if content_type == FHIR_JSON:
        # JSON may carry the damage as \u escapes: judge the string values, name the first by path.
        doc = document if document is not None else _json_or_none(text)
        if doc is not None:
            found: list[tuple[str, str]] = []
            repaired = _fix_strings(doc, "", found, ftfy.fix_encoding_and_explain)
            if not found:
                return None
            text = json.dumps(repaired, ensure_ascii=False)
            if not is_unicode(text):  # a lone surrogate from a \u escape: kept as an escape
                text = json.dumps(repaired)
            return Repair("mojibake", found[0][0], found[0][1], text)
    fixed = ftfy.fix_encoding_and_explain(text)
    if fixed.text == text:
        return None
    return Repair("mojibake", _first_difference(text, fixed.text, content_type), _steps(fixed), fixed.text)


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _steps(fixed) -> str:
    return ", ".join(f"{step} {arg}" for step, arg in (fixed.explanation or []))


def _fix_strings(value, path: str, found: list, fix, depth: int = 0):
    """A copy of a JSON value with mojibake repaired in every string; (path, steps) per repair."""
    if depth > 100:
        return value
    if isinstance(value, str):
        if value.isascii():
            return value
        fixed = fix(value)
        if fixed.text != value:
            found.append((path or "$", _steps(fixed)))
        return fixed.text
    if isinstance(value, list):
        return [_fix_strings(v, f"{path}[{i}]", found, fix, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            k: _fix_strings(v, f"{path}.{k}" if path else k, found, fix, depth + 1) for k, v in value.items()
        }
    return value


def _first_difference(before: str, after: str, content_type: str) -> str:
    old_lines, new_lines = re.split(r"\r\n|\r|\n", before), re.split(r"\r\n|\r|\n", after)
    for number, (old, new) in enumerate(zip(old_lines, new_lines, strict=False), start=1):
        if old == new:
            continue
        if content_type == HL7_ER7 and len(old) > 3 and old[:3].isalnum():
            separator = "|" if old[:3] != "MSH" else old[3]
            old_fields, new_fields = old.split(separator), new.split(separator)
            for index, (a, b) in enumerate(zip(old_fields, new_fields, strict=False)):
                if a != b:
                    return f"{old[:3]}-{index + (1 if old[:3] == 'MSH' else 0)}"
            return old[:3]
        return f"line {number}"
    return "text"


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


def decode_payload(
    raw: bytes, content_type: str, message_type: str, *, diagnosis_code_system: str | None = None
) -> DecodedPayload:
    """Decode and shape-check a payload; never raises for bad content. Mojibake is detected and a
    repair proposed (`repair`), never applied: the caller makes it a data_shape exception. HL7 v2 is
    checked segment by segment (app/domain/hl7_parse.py: a problem names segment, field and byte
    offset). With `diagnosis_code_system` (what the connection's EHR expects), codes are checked
    too (app/domain/codesets.py): `code_set_problem`, and unknown code systems observed."""
    # Imported here: both modules build on this one's Observation and content types.
    from .codesets import check_codes, new_fhir_elements
    from .hl7_parse import check_er7

    decoded = decode_text(raw, content_type)
    text, problem = decoded.text, decoded.problem
    kind = "decode" if problem else None
    doc = None
    observations = []
    if decoded.encoding not in ("utf-8", "utf-8-sig") and not decoded.rule.startswith("MSH-18"):
        observations.append(Observation("decode_fallback", "", decoded.rule))
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
        observations.extend(new_fhir_elements(doc))
    elif problem is None and content_type == HL7_ER7:
        check = check_er7(text, message_type=message_type, encoding=decoded.encoding)
        problem, kind = check.problem, check.kind
        observations.extend(check.observations)
    repair = detect_mojibake(text, content_type, doc) if problem is None else None
    if repair is not None:
        problem = (
            f"text at {repair.where} looks mis-decoded upstream (mojibake; undone by: {repair.explanation}); "
            "a repaired version is proposed as a correction"
        )
        kind = "mojibake"
        observations.append(Observation("mojibake", repair.where, repair.explanation))
    code_set_problem = None
    if diagnosis_code_system is not None and kind != "decode":
        code_set_problem, found = check_codes(
            content_type, text, doc, diagnosis_code_system, encoding=decoded.encoding
        )
        observations.extend(found)
    return DecodedPayload(
        raw,
        text,
        decoded.encoding,
        sha256_hex(raw),
        problem,
        kind,
        decoded.rule,
        repair,
        doc,
        tuple(observations),
        code_set_problem,
    )


def patient_reference(content_type: str, text: str, document: dict | None = None) -> str | None:
    """The patient a message is about, for masking in lists (FHIR subject/patient).
    `document`: the already parsed FHIR resource, if the caller has it."""
    if content_type != FHIR_JSON:
        return None
    doc = document
    if doc is None:
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
