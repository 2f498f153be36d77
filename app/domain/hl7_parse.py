"""HL7 v2 (ER7) structure checks at intake: what makes a message unusable (a data_shape problem
naming segment, field and offset) and what is merely worth counting (observations, SPEC 2 and
issue 5 'drift'). Pure: no I/O, and `check_er7` never raises, whatever text it is given.

Offsets are 0-based positions in the message as received: a byte offset into the stored raw bytes
when the caller says how they were decoded (`encoding`), else a character offset into the text.

Refused (data_shape): no MSH first, or a batch header instead; an unusable MSH-1/MSH-2; an empty
MSH-9; an MSH-12 that is not a v2 version; MSH-9 disagreeing with the message_type submitted; a
line that is not a segment (names are [A-Z][A-Z][A-Z0-9] or Z[A-Z0-9][A-Z0-9] — no HL7 segment
has a digit second, so `P1D` is damage, not a name); a second MSH; a segment the message type
cannot do without (a truncated message). Observed, never refused: empty required fields (the
receiver decides — the simulator answers AE), Z-segments, segments we do not know, a missing EVN
or (A04/A08) PV1, bad escape sequences, fields over their v2.5.1 length.

Hand-rolled rather than python-hl7, because python-hl7 keeps no offsets and accepts nearly
anything; the tests hold the two together (whatever passes here, python-hl7 parses).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .hl7_view import FIELD_NAMES
from .payloads import Observation

_LEADING = re.compile(r"[\s\ufeff]*")
_TERMINATOR = re.compile(r"\r\n|\r|\n")
_STANDARD_NAME = re.compile(r"[A-Z]{2}[A-Z0-9]")
_Z_NAME = re.compile(r"Z[A-Z0-9]{2}")
_VERSION = re.compile(r"2\.\d+(\.\d+)*")
MAX_OBSERVATIONS = 50  # a pathological message does not get to fill the drift table's examples

# Segments of HL7 v2.1–v2.8 (the standard's segment index; the ones real feeds carry and more).
KNOWN_SEGMENTS = frozenset(
    """ABS ACC ADD ADJ AFF AIG AIL AIP AIS AL1 APR ARQ ARV AUT BHS BLC BLG BPO BPX BTS BTX BUI CDM
    CDO CER CM0 CM1 CM2 CNS CON CSP CSR CSS CTD CTI DB1 DG1 DMI DON DRG DSC DSP ECD ECR EDU EQP EQU
    ERR EVN FAC FHS FT1 FTS GOL GP1 GP2 GT1 IAM IAR IIM ILT IN1 IN2 IN3 INV IPC IPR ISD ITM IVC IVT
    LAN LCC LCH LDP LOC LRL MFA MFE MFI MRG MSA MSH NCK NDS NK1 NPU NSC NST NTE OBR OBX ODS ODT OM1
    OM2 OM3 OM4 OM5 OM6 OM7 ORC ORG OVR PAC PCE PCR PD1 PDA PDC PEO PES PID PKG PMT PR1 PRA PRB PRC
    PRD PRT PSG PSH PSL PSS PTH PV1 PV2 PYE QAK QID QPD QRD QRF QRI RCP RDF RDT REL RF1 RFI RGS RMI
    ROL RQ1 RQD RXA RXC RXD RXE RXG RXO RXR RXV SAC SCD SCH SCP SDD SFT SGH SGT SHP SID SLT SPM SPR
    STF STZ TCC TCD TQ1 TQ2 TXA UAC UB1 UB2 URD URS VAR VND""".split()  # noqa: SIM905 (a table, read as one)
)

# Segments a message type cannot do without: absent, the message is truncated (refused).
REQUIRED_SEGMENTS: dict[str, tuple[str, ...]] = {
    "ADT^A01": ("PID", "PV1"),
    "ADT^A04": ("PID",),
    "ADT^A08": ("PID",),
    "ORM^O01": ("PID", "ORC"),
    "ORU^R01": ("PID", "OBR", "OBX"),
    "SIU^S12": ("SCH",),
}
# Required by v2.5.1 too, but commonly left out and harmless to the receivers we know: observed.
EXPECTED_SEGMENTS: dict[str, tuple[str, ...]] = {
    "ADT^A01": ("EVN",),
    "ADT^A04": ("EVN", "PV1"),
    "ADT^A08": ("EVN", "PV1"),
}
# Fields v2.5.1 marks required in every occurrence of their segment; empty → missing_required_field.
REQUIRED_FIELDS: dict[str, tuple[int, ...]] = {
    "MSH": (10, 12),
    "PID": (3, 5),
    "ORC": (1,),
    "OBR": (4,),
    "OBX": (3,),
}
# v2.5.1 maximum lengths (per repetition) of fields that matter downstream; longer → observed.
FIELD_LENGTHS: dict[tuple[str, int], int] = {
    ("MSH", 7): 26,
    ("MSH", 9): 15,
    ("EVN", 2): 26,
    ("PID", 3): 250,
    ("PID", 5): 250,
    ("PID", 7): 26,
    ("PID", 8): 1,
    ("PID", 11): 250,
    ("PID", 19): 16,
    ("PV1", 2): 1,
    ("PV1", 19): 250,
    ("ORC", 1): 2,
    ("ORC", 2): 22,
    ("ORC", 3): 22,
    ("OBR", 2): 22,
    ("OBR", 3): 22,
    ("OBR", 4): 250,
    ("OBX", 3): 250,
    ("OBX", 5): 99999,
    ("DG1", 3): 250,
}
# What may stand between two escape characters (HL7 v2.5.1 section 2.7).
_ESCAPE = re.compile(
    r"[FSTREHN]|X(?:[0-9A-Fa-f]{2})+|Z.*|C[0-9A-Fa-f]{4}|M[0-9A-Fa-f]{4}(?:[0-9A-Fa-f]{2})?"
    r"|\.(?:br|fi|nf|sp\d*|in[+-]?\d+|ti[+-]?\d+|sk\d*|ce)",
    re.S,
)


@dataclass(frozen=True)
class Hl7Check:
    """The verdict on one ER7 message."""

    problem: str | None = None  # set when the message cannot be used: a data_shape exception
    kind: str | None = None  # parse | shape (MSH-9 says another message type)
    where: str = ""  # the segment or field the problem names ("MSH-9", "segment 4")
    message_type: str = ""  # MSH-9 as "ADT^A08" (event type and trigger) when readable
    observations: tuple[Observation, ...] = ()


@dataclass(frozen=True)
class Er7Segment:
    """One segment of a message, with the offset of each field for error messages."""

    name: str
    number: int  # 1-based position among the message's segments
    occurrence: int  # 1-based among segments of the same name
    offset: int  # of the segment's first character in the text
    fields: tuple[tuple[str, int], ...]  # (value, offset) by field number; index 0 is the name

    def field(self, number: int) -> tuple[str, int]:
        """(value, offset) of SEG-n; ('', end of segment) when the segment is shorter."""
        index = number - 1 if self.name == "MSH" else number
        if 0 < index < len(self.fields):
            return self.fields[index]
        last_value, last_offset = self.fields[-1]
        return "", last_offset + len(last_value)

    def label(self, number: int) -> str:
        """'PID-5' for the first PID, 'OBX[2]-3' for the second OBX."""
        return f"{self.name}{f'[{self.occurrence}]' if self.occurrence > 1 else ''}-{number}"


@dataclass(frozen=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


def field_name(segment: str, number: int) -> str:
    """'PID-5 (Patient Name)', or 'ZPD-2' when we have no name for it."""
    names = FIELD_NAMES.get(segment, ())
    name = names[number - 1] if 0 < number <= len(names) else ""
    return f"{segment}-{number} ({name})" if name else f"{segment}-{number}"


def er7_segments(text: str, separators: Separators | None = None) -> list[Er7Segment]:
    """The message's segments with field offsets (any of \\r, \\r\\n, \\n ends a segment; blank
    lines and whitespace before the first segment are skipped). Never raises; a line that is not a
    segment is still returned, named by whatever precedes its first field separator."""
    seps = separators or read_separators(text)
    out: list[Er7Segment] = []
    seen: dict[str, int] = {}
    for line, offset in _lines(text):
        fields, position = [], offset
        for part in line.split(seps.field):
            fields.append((part, position))
            position += len(part) + len(seps.field)
        name = fields[0][0]
        seen[name] = seen.get(name, 0) + 1
        out.append(Er7Segment(name, len(out) + 1, seen[name], offset, tuple(fields)))
    return out


def read_separators(text: str) -> Separators:
    """Separators from MSH-1/MSH-2 (standard ones for whatever is missing)."""
    start = _LEADING.match(text).end()
    if not text.startswith("MSH", start) or len(text) <= start + 3:
        return Separators()
    field = text[start + 3]
    encoding = text[start + 4 :].split(field, 1)[0].split("\r", 1)[0].split("\n", 1)[0]
    defaults = Separators()
    return Separators(
        field,
        encoding[0] if len(encoding) > 0 else defaults.component,
        encoding[1] if len(encoding) > 1 else defaults.repetition,
        encoding[2] if len(encoding) > 2 else defaults.escape,
        encoding[3] if len(encoding) > 3 else defaults.subcomponent,
    )


def _lines(text: str):
    """(line, offset) for each non-blank line. Whitespace before the first segment and after the last
    is not part of the message (MLLP's VT and FS count as whitespace here)."""
    position, end = _LEADING.match(text).end(), len(text.rstrip())
    for match in _TERMINATOR.finditer(text, position, end):
        if text[position : match.start()].strip():
            yield text[position : match.start()], position
        position = match.end()
    if text[position:end].strip():
        yield text[position:end], position


def offset_phrase(text: str, offset: int, encoding: str | None = None) -> str:
    """'at byte offset 212' (into the stored raw bytes) when we know how they were decoded, else
    'at character offset 212' (into the text)."""
    if encoding:
        try:
            prefix = len(text[:offset].encode(encoding.removesuffix("-sig"), "replace"))
            return f"at byte offset {prefix + (3 if encoding == 'utf-8-sig' else 0)}"
        except LookupError:
            pass
    return f"at character offset {offset}"


def _quoted(value: str) -> str:
    """'P1D', with control characters made visible ('\\x1c') and backslashes left as they are."""
    return "'" + "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value) + "'"


def type_key(message_type: str, component: str = "^") -> str:
    """'ADT^A08' from 'ADT^A08^ADT_A01' (event type and trigger, as the tables are keyed)."""
    return "^".join(part.strip() for part in message_type.split(component)[:2]).strip("^")


class _Checker:
    def __init__(self, text: str, encoding: str | None):
        self.text = text
        self.encoding = encoding
        self.observations: list[Observation] = []
        self._noted: set[tuple[str, str]] = set()

    def at(self, offset: int) -> str:
        return offset_phrase(self.text, offset, self.encoding)

    def note(self, kind: str, where: str, detail: Callable[[], str]) -> None:
        """One observation per (kind, where); `detail` is only worked out for those kept (an offset
        costs a pass over the text)."""
        if (kind, where) in self._noted or len(self.observations) >= MAX_OBSERVATIONS:
            return
        self._noted.add((kind, where))
        self.observations.append(Observation(kind, where, detail()))

    def result(self, problem=None, kind="parse", where="", message_type="") -> Hl7Check:
        return Hl7Check(
            problem,
            kind if problem else None,
            where if problem else "",
            message_type,
            tuple(self.observations),
        )


def check_er7(text: str, *, message_type: str | None = None, encoding: str | None = None) -> Hl7Check:
    """The verdict on one ER7 message (module docstring). `message_type`: what the sender said it
    is (checked against MSH-9); `encoding`: how the text was decoded from the stored bytes, so that
    offsets are byte offsets. Never raises."""
    try:
        return _check(text, message_type, encoding)
    except Exception as exc:  # a bug here must not lose a message at intake: refuse, keep the bytes
        return Hl7Check(
            f"the HL7 v2 message could not be checked ({type(exc).__name__}); kept for a person to read",
            "parse",
        )


def _check(text: str, message_type: str | None, encoding: str | None) -> Hl7Check:
    c = _Checker(text, encoding)
    start = _LEADING.match(text).end()
    head = text[start : start + 3]
    if head in ("FHS", "BHS"):
        return c.result(
            f"payload is an HL7 batch ({head} {c.at(start)}), not one message: import batch files "
            "with `recon import`",
            where="segment 1",
        )
    if head != "MSH":
        return c.result(
            f"HL7 v2 payload does not start with an MSH segment (found {_quoted(text[start : start + 10])} "
            f"{c.at(start)})",
            where="segment 1",
        )
    problem = _msh_separators(c, text, start)
    if problem:
        return c.result(problem, where="MSH-2" if "MSH-2" in problem else "MSH-1")
    seps = read_separators(text)
    segments = er7_segments(text, seps)
    msh = segments[0]

    msh9, msh9_at = msh.field(9)
    actual_type = type_key(msh9.split(seps.repetition)[0], seps.component)
    if not actual_type:
        return c.result(f"{field_name('MSH', 9)} is empty {c.at(msh9_at)}", where="MSH-9")
    if message_type is not None and not _same_type(actual_type, message_type):
        return c.result(
            f"{field_name('MSH', 9)} {_quoted(actual_type)} {c.at(msh9_at)} does not match message_type "
            f"{_quoted(message_type)}",
            "shape",
            "MSH-9",
            actual_type,
        )
    version, version_at = msh.field(12)
    version_id = version.split(seps.component)[0].strip()
    if version_id and not _VERSION.fullmatch(version_id):
        return c.result(
            f"{field_name('MSH', 12)} {_quoted(version_id[:20])} {c.at(version_at)} is not an HL7 v2 version",
            where="MSH-12",
            message_type=actual_type,
        )

    for segment in segments:
        problem = _segment_problem(c, segment, seps, text)
        if problem:
            return c.result(problem, where=f"segment {segment.number}", message_type=actual_type)
        _observe_fields(c, segment, seps)

    present = {segment.name for segment in segments}
    for name in REQUIRED_SEGMENTS.get(actual_type, ()):
        if name not in present:
            return c.result(
                f"message is truncated: no {name} segment after MSH for {actual_type} (the message "
                f"ends {c.at(len(text.rstrip()))})",
                where=name,
                message_type=actual_type,
            )
    for name in EXPECTED_SEGMENTS.get(actual_type, ()):
        if name not in present:
            c.note("missing_required_field", name, lambda name=name: f"{actual_type} has no {name} segment")

    return c.result(message_type=actual_type)


def _same_type(actual: str, declared: str) -> bool:
    """MSH-9 against the message_type submitted, as far as the sender spelled it out."""
    wanted = type_key(declared).split("^")
    return actual.split("^")[: len(wanted)] == wanted


def _msh_separators(c: _Checker, text: str, start: int) -> str | None:
    if len(text) <= start + 3 or text[start + 3] in "\r\n":
        return f"{field_name('MSH', 1)} is missing: the message ends {c.at(start + 3)}"
    field = text[start + 3]
    if field.isalnum() or field.isspace():
        return f"{field_name('MSH', 1)} {_quoted(field)} {c.at(start + 3)} is not a usable field separator"
    encoding = _TERMINATOR.split(text[start + 4 :], 1)[0].split(field, 1)[0]
    # Four characters (component, repetition, escape, subcomponent); v2.7 adds a fifth (truncation).
    if not 4 <= len(encoding) <= 5:
        return (
            f"{field_name('MSH', 2)} {_quoted(encoding[:10])} {c.at(start + 4)} must be 4 encoding characters "
            "(component, repetition, escape, subcomponent), like ^~\\&"
        )
    if len(set(encoding + field)) != len(encoding) + 1 or any(
        ch.isalnum() or ch.isspace() for ch in encoding
    ):
        return (
            f"{field_name('MSH', 2)} {_quoted(encoding)} {c.at(start + 4)} must be distinct punctuation, "
            f"none of them the field separator {_quoted(field)}"
        )
    return None


def _segment_problem(c: _Checker, segment: Er7Segment, seps: Separators, text: str) -> str | None:
    name = segment.name
    if not (len(name) == 3 and (_STANDARD_NAME.fullmatch(name) or _Z_NAME.fullmatch(name))):
        shown = name[:10] + ("…" if len(name) > 10 else "")
        hint = ""
        first_end = _TERMINATOR.search(text)
        if (
            first_end is not None
            and first_end.group() == "\r"
            and text[max(segment.offset - 2, 0) : segment.offset] not in ("\r\n",)
            and text[segment.offset - 1 : segment.offset] == "\n"
        ):
            hint = " (a line break inside a field? the other segments end with \\r)"
        return f"segment {segment.number} {_quoted(shown)} is not a segment name {c.at(segment.offset)}{hint}"
    framing = next((ch for ch in "\x0b\x1c" if ch in "".join(v for v, _ in segment.fields)), None)
    if framing is not None:
        inside = segment.offset + text[segment.offset :].index(framing)
        return (
            f"segment {segment.number} {name} holds the MLLP framing character {_quoted(framing)} "
            f"{c.at(inside)}: it would cut the message in two on the wire"
        )
    if name == "MSH" and segment.number > 1:
        return (
            f"segment {segment.number} is a second MSH {c.at(segment.offset)}: one message per request "
            "(import batch files with `recon import`)"
        )
    if name in ("FHS", "BHS", "BTS", "FTS"):
        return (
            f"segment {segment.number} {name} {c.at(segment.offset)} belongs to a batch file, not a message"
        )
    if name.startswith("Z"):
        c.note("z_segment", name, lambda: f"custom segment {name} {c.at(segment.offset)}")
    elif name not in KNOWN_SEGMENTS:
        c.note("unknown_segment", name, lambda: f"segment {segment.number} {name} {c.at(segment.offset)}")
    return None


def _observe_fields(c: _Checker, segment: Er7Segment, seps: Separators) -> None:
    name = segment.name
    for number in REQUIRED_FIELDS.get(name, ()):
        value, offset = segment.field(number)
        if not value.strip(" " + seps.component + seps.repetition + seps.subcomponent):
            c.note(
                "missing_required_field",
                segment.label(number),
                lambda number=number, offset=offset: f"{field_name(name, number)} is empty {c.at(offset)}",
            )
    # MSH-1 and MSH-2 are the separators themselves; fields[i] is MSH-(i+1), SEG-i otherwise.
    numbers = range(3, len(segment.fields) + 1) if name == "MSH" else range(1, len(segment.fields))
    for number in numbers:
        value, offset = segment.field(number)
        if not value:
            continue
        limit = FIELD_LENGTHS.get((name, number))
        if limit is not None and len(value) > limit:
            longest = max(len(rep) for rep in value.split(seps.repetition))
            if longest > limit:
                c.note(
                    "field_too_long",
                    segment.label(number),
                    lambda number=number, offset=offset, longest=longest, limit=limit: (
                        f"{field_name(name, number)} is {longest} characters {c.at(offset)}, over its "
                        f"v2.5.1 length of {limit}"
                    ),
                )
        if seps.escape in value:
            bad = _bad_escape(value, seps)
            if bad is not None:
                relative, what = bad
                c.note(
                    "bad_escape",
                    segment.label(number),
                    lambda number=number, at=offset + relative, what=what: (
                        f"{field_name(name, number)}: {what} {c.at(at)}"
                    ),
                )


def _bad_escape(value: str, seps: Separators) -> tuple[int, str] | None:
    """(offset in the field, what is wrong) of the first bad escape sequence, if any."""
    esc = seps.escape
    stops = {seps.component, seps.repetition, seps.subcomponent}
    position = value.find(esc)
    while position >= 0:
        end = position + 1
        while end < len(value) and value[end] != esc and value[end] not in stops:
            end += 1
        if end >= len(value) or value[end] != esc:
            return position, f"escape sequence '{value[position:end][:12]}' is not closed"
        body = value[position + 1 : end]
        if not _ESCAPE.fullmatch(body):
            return position, f"unknown escape sequence '{value[position : end + 1][:12]}'"
        position = value.find(esc, end + 1)
    return None
