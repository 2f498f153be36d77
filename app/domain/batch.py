"""Batch files (`recon import`): split an HL7 v2 batch file or a FHIR NDJSON file into messages.

Pure: bytes in, items out; no I/O, no database. Works on bytes throughout — an HL7 file may carry
Latin-1 or cp1252 in its fields, so it is never decoded as a whole: segment ids (MSH, BHS, ...)
are ASCII and the split happens on those bytes. Every item is an exact slice of the file (its
`raw` equals `data[offset:offset + len(raw)]`), so what is stored is byte-for-byte what was in the
file; decoding and judging each message is intake's job.

HL7 v2: FHS/BHS ... BTS/FTS envelopes (batches may follow one another or sit inside a file
header), bare concatenated messages, or MLLP-framed blocks (<VT> message <FS><CR>). Segment
terminators \\r, \\n or \\r\\n. A message runs from its MSH to the end of its last segment, the
segment terminator included. Segments outside any message that are not envelope segments are
not dropped: each such run becomes an item of its own (intake then makes it a data_shape
exception, bytes kept). A BTS-1 count that differs from the messages found is a warning, not a
failure.

FHIR NDJSON: one item per line (\\n or \\r\\n), blank lines skipped. A line that is not JSON is
still an item; its type falls back to UNKNOWN_TYPE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import Invalid
from .payloads import FHIR_JSON, HL7_ER7

HL7_V2 = "hl7v2"
FHIR_NDJSON = "fhir-ndjson"
UNKNOWN_TYPE = "unknown"  # message_type of an item whose type cannot be read (intake judges it)

UTF8_BOM = b"\xef\xbb\xbf"
_WHITESPACE = b" \t\r\n"  # not \v: that is the MLLP start block
_VT, _FS = b"\x0b", b"\x1c"  # MLLP start and end block
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
_HL7_TERMINATORS = re.compile(rb"\r\n|\r|\n")
_MLLP_TERMINATORS = re.compile(rb"\r\n|\r|\n|\x0b|\x1c")
_NEWLINE = re.compile(rb"\n")
_CONTENT = re.compile(rb"[^ \t\r\n]")
_MESSAGE_TYPE = re.compile(r"[\x21-\x7e]{1,40}")  # printable ASCII, no spaces, fits the column
_RESOURCE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,39}")


class UnrecognisedFile(Invalid):
    code = "unrecognised_batch_file"


@dataclass(frozen=True)
class BatchItem:
    position: int  # 1-based, in file order: part of the idempotency key
    raw: bytes  # exactly the file's bytes
    message_type: str  # MSH-9 (`ADT^A08`) or resourceType; UNKNOWN_TYPE when unreadable
    offset: int  # byte offset of `raw` in the file


@dataclass
class SplitReport:
    """What the split found besides the items; filled in while items are produced."""

    format: str
    mllp_framed: bool = False
    batches: int = 0  # BHS segments
    file_headers: int = 0  # FHS segments
    messages: int = 0  # items that start with MSH (HL7) / all items (NDJSON)
    stray_runs: int = 0  # HL7 segment runs outside any message, kept as items
    warnings: list[str] = field(default_factory=list)

    @property
    def content_type(self) -> str:
        return HL7_ER7 if self.format == HL7_V2 else FHIR_JSON

    def describe(self) -> str:
        """`HL7 v2 batch, 3 batches` / `HL7 v2, MLLP-framed` / `FHIR NDJSON`."""
        if self.format == FHIR_NDJSON:
            return "FHIR NDJSON"
        if self.batches:
            return f"HL7 v2 batch, {self.batches} batch{'es' if self.batches != 1 else ''}"
        if self.file_headers:
            return "HL7 v2 batch file"
        return "HL7 v2, MLLP-framed" if self.mllp_framed else "HL7 v2, bare messages"


def _start(data) -> int:
    """Offset after a leading UTF-8 byte-order mark (an editor's mark for the file, not content)."""
    return len(UTF8_BOM) if data[: len(UTF8_BOM)] == UTF8_BOM else 0


def _first_content(data) -> int | None:
    """Offset of the first non-whitespace byte after a BOM, or None for an empty file."""
    match = _CONTENT.search(data, _start(data))
    return match.start() if match else None


def detect_format(data) -> str | None:
    """HL7_V2, FHIR_NDJSON or None, from the first non-whitespace bytes."""
    first = _first_content(data)
    head = bytes(data[first : first + 3]) if first is not None else b""
    if head[:1] == b"{":
        return FHIR_NDJSON
    if head[:1] == _VT or head in (b"FHS", b"BHS", b"MSH"):
        return HL7_V2
    return None


def open_batch(data) -> tuple[SplitReport, Iterator[BatchItem]]:
    """The report and a lazy iterator of items for a batch file; raises UnrecognisedFile when the
    content is neither HL7 v2 nor FHIR NDJSON. The report is complete once the iterator is done.
    `data`: bytes, or any buffer that slices to bytes (an mmap of a large file)."""
    if _first_content(data) is None:
        raise UnrecognisedFile("the file is empty: nothing to import")
    fmt = detect_format(data)
    if fmt is None:
        raise UnrecognisedFile(
            "not an HL7 v2 batch file (starting with FHS, BHS, MSH or an MLLP block) "
            "nor FHIR NDJSON (one JSON resource per line, starting with '{')"
        )
    report = SplitReport(fmt)
    items = split_ndjson(data, report) if fmt == FHIR_NDJSON else split_hl7(data, report)
    return report, items


def split(data) -> tuple[SplitReport, list[BatchItem]]:
    """open_batch, materialised."""
    report, items = open_batch(data)
    return report, list(items)


# --- HL7 v2 -------------------------------------------------------------------------------------


def _segment_id(segment: bytes) -> bytes:
    """The 3-byte id of a segment when what follows it is a separator (or nothing), else b''."""
    name = segment[:3]
    if len(name) == 3 and (len(segment) == 3 or not segment[3:4].isalnum()):
        return name
    return b""


def hl7_message_type(msh: bytes) -> str:
    """MSH-9 message code and trigger event as `ADT^A08` (first repetition, whatever the component
    separator; read as intake's HL7 check reads it), or UNKNOWN_TYPE. `msh`: the segment's bytes."""
    msh = msh.lstrip(b" \t")
    separator = msh[3:4]
    if msh[:3] != b"MSH" or not separator or separator.isalnum():
        return UNKNOWN_TYPE
    fields = msh.split(separator)
    if len(fields) <= 8:
        return UNKNOWN_TYPE
    component, repetition = fields[1][:1] or b"^", fields[1][1:2]
    value = fields[8].split(repetition)[0] if repetition else fields[8]
    try:
        text = b"^".join(part.strip() for part in value.split(component)[:2]).decode("ascii")
    except UnicodeDecodeError:
        return UNKNOWN_TYPE
    text = text.strip("^")
    return text if _MESSAGE_TYPE.fullmatch(text) else UNKNOWN_TYPE


def _bts_count(segment: bytes) -> tuple[int | None, str]:
    """BTS-1 (batch message count) as an int, and its text ('' when absent)."""
    separator = segment[3:4]
    fields = segment.split(separator) if separator else [segment]
    text = fields[1].strip().decode("ascii", "replace") if len(fields) > 1 else ""
    return (int(text), text) if text.isdigit() else (None, text)


@dataclass
class _Batch:
    ordinal: int
    offset: int
    messages: int = 0


def split_hl7(data, report: SplitReport | None = None) -> Iterator[BatchItem]:
    """HL7 v2 items of `data` (module docstring); never raises for any bytes."""
    report = report if report is not None else SplitReport(HL7_V2)
    start = _start(data)
    first = _first_content(data)
    report.mllp_framed = first is not None and data[first : first + 1] == _VT
    terminators = _MLLP_TERMINATORS if report.mllp_framed else _HL7_TERMINATORS
    position = 0
    run_start: int | None = None  # the open run of segments (a message, or stray segments)
    run_end = 0  # end of its last non-blank segment, terminator included
    run_type = ""
    batch: _Batch | None = None
    file_header_batches = 0  # batches seen since the open FHS

    def close_run() -> BatchItem | None:
        nonlocal run_start, position
        if run_start is None:
            return None
        position += 1
        item = BatchItem(position, bytes(data[run_start:run_end]), run_type or UNKNOWN_TYPE, run_start)
        if run_type:
            report.messages += 1
            if batch is not None:
                batch.messages += 1
        else:
            report.stray_runs += 1
        run_start = None
        return item

    def close_batch(bts: bytes | None, at: int) -> None:
        nonlocal batch
        if batch is None:
            report.warnings.append(f"BTS at byte {at} without a BHS before it")
            return
        where = f"batch {batch.ordinal} (BHS at byte {batch.offset})"
        if bts is None:
            report.warnings.append(f"{where} has no BTS; {batch.messages} message(s) found")
        else:
            count, text = _bts_count(bts)
            if count is None and text:
                report.warnings.append(f"{where}: BTS-1 {text!r} is not a message count")
            elif count is not None and count != batch.messages:
                report.warnings.append(f"{where}: BTS-1 says {count} message(s), {batch.messages} found")
        batch = None

    def segments() -> Iterator[tuple[int, int, int, bool]]:
        """(start, end of content, end with terminator, hard boundary) of every segment."""
        begin = start
        for match in terminators.finditer(data, start):
            boundary = match.group() in (_VT, _FS)  # framing bytes belong to no message
            yield begin, match.start(), (match.start() if boundary else match.end()), boundary
            begin = match.end()
        yield begin, len(data), len(data), True

    for seg_start, seg_end, seg_stop, boundary in segments():
        content = bytes(data[seg_start:seg_end])
        stripped = content.lstrip(b" \t")
        if stripped.strip(_WHITESPACE):
            name = _segment_id(stripped)
            if name == b"MSH" or name in _ENVELOPE:
                item = close_run()
                if item is not None:
                    yield item
            if name == b"MSH":
                run_start, run_type = seg_start, hl7_message_type(stripped)
                run_end = seg_stop
            elif name == b"FHS":
                report.file_headers += 1
                file_header_batches = 0
            elif name == b"BHS":
                if batch is not None:
                    close_batch(None, seg_start)
                report.batches += 1
                file_header_batches += 1
                batch = _Batch(report.batches, seg_start)
            elif name == b"BTS":
                close_batch(stripped, seg_start)
            elif name == b"FTS":
                if batch is not None:
                    close_batch(None, seg_start)
                count, text = _bts_count(stripped)
                if count is not None and count != file_header_batches:
                    report.warnings.append(
                        f"FTS at byte {seg_start}: FTS-1 says {count} batch(es), {file_header_batches} found"
                    )
            else:  # a segment of the open message, or the start of a stray run
                if run_start is None:
                    run_start, run_type = seg_start, ""
                run_end = seg_stop
        if boundary:
            item = close_run()
            if item is not None:
                yield item
    if batch is not None:
        close_batch(None, len(data))
    if report.stray_runs:
        report.warnings.append(
            f"{report.stray_runs} run(s) of segments outside any message (no MSH) kept as items"
        )


# --- FHIR NDJSON --------------------------------------------------------------------------------


def resource_type(line: bytes) -> str:
    """The resourceType of one NDJSON line, or UNKNOWN_TYPE (not JSON, no usable resourceType)."""
    try:
        document = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return UNKNOWN_TYPE
    value = document.get("resourceType") if isinstance(document, dict) else None
    if isinstance(value, str) and _RESOURCE_TYPE.fullmatch(value):
        return value
    return UNKNOWN_TYPE


def split_ndjson(data, report: SplitReport | None = None) -> Iterator[BatchItem]:
    """One item per non-blank line; never raises for any bytes."""
    report = report if report is not None else SplitReport(FHIR_NDJSON)
    begin = _start(data)
    position = 0

    def lines() -> Iterator[tuple[int, int]]:
        nonlocal begin
        for match in _NEWLINE.finditer(data, begin):
            yield begin, match.start()
            begin = match.end()
        yield begin, len(data)

    for line_start, line_end in lines():
        line = bytes(data[line_start:line_end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip(_WHITESPACE):
            continue
        position += 1
        report.messages += 1
        yield BatchItem(position, line, resource_type(line), line_start)
