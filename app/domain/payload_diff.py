"""What a correction changes, at field level: the review a clinical lead reads before approving.

Both versions are normalised before anything is compared, so layout never shows as a change:

* FHIR JSON is pretty-printed with a 2-space indent and keys in a stable order — `resourceType`,
  `id`, `meta` first, then alphabetical, a primitive's `_name` extension right after `name`.
  Numbers keep the digits they were sent with (`1.0` stays `1.0`: FHIR decimals carry precision).
* HL7 v2 is one segment per line (CR, LF or CRLF between segments; blank lines dropped).

`changes` lists the changed paths with old → new values — FHIRPath-like for FHIR
(`MedicationRequest.dosageInstruction[0].text`, with a JSON Pointer beside it), segment-field-
component for HL7 v2 (`PID-5.1`, `PID-3[2].1`, `OBX[2]-5`) — and `text_diff` diffs the normalised
texts, so a one-field change is one or two lines. `issue_targets` finds the line each issue of a
failed attempt points at, for the correction editor's "jump to" links.

Pure functions over text that never raise on any input; bounded so a huge payload cannot blow up
a page (MAX_CHANGES changes, values cut at MAX_VALUE_CHARS).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.domain.hl7_view import MAX_SEGMENTS, Hl7Field, Hl7Segment, hl7_view
from app.domain.payloads import FHIR_JSON, HL7_ER7

MAX_CHANGES = 200
MAX_VALUE_CHARS = 160
MAX_FIELD_LEVEL_CHARS = 2_000_000  # past this, only the text diff (HL7 parsing is per character)
FIRST_KEYS = ("resourceType", "id", "meta")

ADDED, REMOVED, CHANGED = "added", "removed", "changed"


@dataclass(frozen=True)
class Change:
    """One changed path. `old`/`new` are display text (cut at MAX_VALUE_CHARS), None when absent."""

    path: str  # FHIRPath-like (FHIR) or segment-field-component (HL7 v2)
    old: str | None
    new: str | None
    kind: str  # added | removed | changed
    pointer: str | None = None  # JSON Pointer (RFC 6901), FHIR only


@dataclass(frozen=True)
class DiffLine:
    kind: str  # add | del | hunk | file | same
    text: str


@dataclass
class Review:
    """Everything a reviewer reads about one correction: the change list first, then the diff."""

    changes: list[Change]
    truncated: bool  # more than MAX_CHANGES changes: the list shows the first ones
    diff: list[DiffLine]
    note: str = ""  # why there is no field-level list (not JSON, too large...)


@dataclass(frozen=True)
class IssueTarget:
    """Where one issue of the failed attempt points in the normalised text (1-based line)."""

    label: str  # "issue 1", "exception detail"
    path: str  # what the issue names: a FHIRPath expression, `PID-7`
    line: int
    start: int = 0  # character columns on that line to select; end 0: the whole line
    end: int = 0
    exact: bool = True  # False: the path is absent, `line` is its nearest present parent


# --- normalising -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Number:
    """A JSON number as sent: compared and printed by its digits."""

    text: str


_NOT_JSON = object()


def _parse_json(text: str):
    """The document, or _NOT_JSON when the text is not JSON. Numbers other than plain integers keep
    their digits; very deep or odd input that the parser refuses counts as not JSON."""
    try:
        return json.loads(text, parse_float=_Number, parse_constant=_Number)
    except (ValueError, RecursionError, TypeError):
        return _NOT_JSON


def _key_order(key: str) -> tuple:
    if key in FIRST_KEYS:
        return (0, FIRST_KEYS.index(key), "", False)
    return (1, 0, key.lstrip("_"), key.startswith("_"))


def _ordered(obj: dict) -> list[tuple[str, object]]:
    return sorted(obj.items(), key=lambda kv: _key_order(kv[0]))


def _scalar(value) -> str:
    if isinstance(value, _Number):
        return value.text
    return json.dumps(value, ensure_ascii=False)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _step(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.fullmatch(key) else f"{path}.`{key}`"


def _pointer_step(pointer: str, key: str | int) -> str:
    return f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _emit(value, path: str, depth: int, prefix: str, comma: str, out: list[tuple[str, str]]) -> None:
    pad = "  " * depth
    if isinstance(value, dict) and value:
        out.append((f"{pad}{prefix}{{", path))
        items = _ordered(value)
        for i, (key, child) in enumerate(items):
            last = i == len(items) - 1
            _emit(child, _step(path, key), depth + 1, _scalar(key) + ": ", "" if last else ",", out)
        out.append((f"{pad}}}{comma}", path))
    elif isinstance(value, list) and value:
        out.append((f"{pad}{prefix}[", path))
        for i, child in enumerate(value):
            _emit(child, f"{path}[{i}]", depth + 1, "", "" if i == len(value) - 1 else ",", out)
        out.append((f"{pad}]{comma}", path))
    else:
        empty = "{}" if isinstance(value, dict) else "[]" if isinstance(value, list) else _scalar(value)
        out.append((f"{pad}{prefix}{empty}{comma}", path))


def _root(doc) -> str:
    name = doc.get("resourceType") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and _IDENTIFIER.fullmatch(name) else "$"


def _json_lines(doc) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    try:
        _emit(doc, _root(doc), 0, "", "", lines)
    except RecursionError:
        return []
    return lines


_SEGMENT_BREAK = re.compile(r"\r\n|\r|\n")


def _hl7_lines(text: str) -> list[str]:
    return [line for line in _SEGMENT_BREAK.split(text) if line.strip()]


def normalise(content_type: str, text: str | None) -> str:
    """The text both sides of a diff are compared in, and the correction editor opens with.
    FHIR JSON pretty-printed in the stable key order; HL7 v2 one segment per line; anything that
    does not parse (invalid JSON, another content type) returned as it is. Never raises."""
    text = text or ""
    if content_type == FHIR_JSON:
        doc = _parse_json(text)
        lines = _json_lines(doc) if doc is not _NOT_JSON else []
        return "\n".join(line for line, _ in lines) if lines else text
    if content_type == HL7_ER7:
        return "\n".join(_hl7_lines(text))
    return text


# --- the change list: FHIR ---------------------------------------------------------------------------


def _display(value) -> str:
    if isinstance(value, (dict, list)):
        try:
            text = json.dumps(value, ensure_ascii=False, default=lambda n: float(n.text))
        except (ValueError, RecursionError):
            text = "…"
    else:
        text = _scalar(value)
    return _cut(text)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


class _Full(Exception):
    """The change list reached its bound."""


def _add(out: list[Change], limit: int, change: Change) -> None:
    out.append(change)
    if len(out) >= limit:
        raise _Full


_MISSING = object()


def _same_scalar(a, b) -> bool:
    # JSON types, not Python's: true is not 1, "1" is not 1.
    return type(a) is type(b) and a == b


def _walk(a, b, path: str, pointer: str, out: list[Change], limit: int) -> None:
    if a is _MISSING:
        _add(out, limit, Change(path, None, _display(b), ADDED, pointer))
    elif b is _MISSING:
        _add(out, limit, Change(path, _display(a), None, REMOVED, pointer))
    elif isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(a.keys() | b.keys(), key=_key_order)
        for key in keys:
            _walk(
                a.get(key, _MISSING),
                b.get(key, _MISSING),
                _step(path, key),
                _pointer_step(pointer, key),
                out,
                limit,
            )
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            _walk(
                a[i] if i < len(a) else _MISSING,
                b[i] if i < len(b) else _MISSING,
                f"{path}[{i}]",
                _pointer_step(pointer, i),
                out,
                limit,
            )
    elif not _same_scalar(a, b):
        _add(out, limit, Change(path, _display(a), _display(b), CHANGED, pointer))


def _fhir_changes(a, b, limit: int) -> list[Change]:
    out: list[Change] = []
    root = _root(b) if _root(b) != "$" else _root(a)
    try:
        _walk(a, b, root, "", out, limit)
    except _Full:
        pass
    except RecursionError:
        return [Change(root, None, None, CHANGED, "")]
    return out


# --- the change list: HL7 v2 -------------------------------------------------------------------------


@dataclass
class _Seps:
    component: str = "^"
    repetition: str = "~"
    subcomponent: str = "&"


def _seps(segments: list[Hl7Segment]) -> _Seps:
    head = next((s for s in segments[:1] if s.name in ("MSH", "FHS", "BHS")), None)
    encoding = next((f.value for f in head.fields if f.number == 2), "") if head else ""
    if len(encoding) >= 2:
        return _Seps(encoding[0], encoding[1], encoding[3] if len(encoding) > 3 else "&")
    return _Seps()


def _segment_key(segment: Hl7Segment) -> tuple:
    return (segment.name, tuple((f.number, f.value) for f in segment.fields))


def _rep_text(field_: Hl7Field | None, r: int, seps: _Seps) -> str:
    if field_ is None or r >= len(field_.repetitions):
        return ""
    return seps.component.join(c.value for c in field_.repetitions[r].components).rstrip(seps.component)


def _comp(field_: Hl7Field | None, r: int, c: int) -> list[str]:
    if field_ is None or r >= len(field_.repetitions) or c >= len(field_.repetitions[r].components):
        return []
    return field_.repetitions[r].components[c].subcomponents


def _kind(old: str, new: str) -> str:
    return ADDED if not old else REMOVED if not new else CHANGED


def _value_change(path: str, old: str, new: str) -> Change:
    return Change(path, _cut(old) if old else None, _cut(new) if new else None, _kind(old, new))


def _field_changes(label: str, a: Hl7Field | None, b: Hl7Field | None, seps: _Seps) -> list[Change]:
    old, new = (a.value if a else ""), (b.value if b else "")
    number = (a or b).number
    base = f"{label}-{number}"
    if old == new:
        return []
    header = (a or b).segment in ("MSH", "FHS", "BHS") and number <= 2
    fields = [f for f in (a, b) if f is not None]
    reps = max(len(f.repetitions) for f in fields)
    comps = max(len(r.components) for f in fields for r in f.repetitions)
    subs = max(len(c.subcomponents) for f in fields for r in f.repetitions for c in r.components)
    if header or (reps == 1 and comps == 1 and subs == 1):
        return [_value_change(base, old, new)]
    out = []
    for r in range(reps):
        rep_path = f"{base}[{r + 1}]" if reps > 1 else base
        rep_old, rep_new = _rep_text(a, r, seps), _rep_text(b, r, seps)
        if rep_old == rep_new:
            continue
        if not rep_old or not rep_new or comps == 1 and subs == 1:
            out.append(_value_change(rep_path, rep_old, rep_new))
            continue
        for c in range(comps):
            sub_old, sub_new = _comp(a, r, c), _comp(b, r, c)
            comp_path = f"{rep_path}.{c + 1}"
            if seps.subcomponent.join(sub_old) == seps.subcomponent.join(sub_new):
                continue
            if max(len(sub_old), len(sub_new)) <= 1:
                out.append(_value_change(comp_path, "".join(sub_old), "".join(sub_new)))
                continue
            for s in range(max(len(sub_old), len(sub_new))):
                so = sub_old[s] if s < len(sub_old) else ""
                sn = sub_new[s] if s < len(sub_new) else ""
                if so != sn:
                    out.append(_value_change(f"{comp_path}.{s + 1}", so, sn))
    return out


def _segment_text(segment: Hl7Segment) -> str:
    fields = sorted(segment.fields, key=lambda f: f.number)
    values = {f.number: f.value for f in fields}
    top = max(values, default=0)
    if segment.name in ("MSH", "FHS", "BHS"):
        sep = values.get(1, "|")
        return segment.name + sep + sep.join(values.get(n, "") for n in range(2, top + 1))
    return "|".join([segment.name or values.get(0, ""), *(values.get(n, "") for n in range(1, top + 1))])


def _hl7_changes(before: str, after: str, limit: int) -> list[Change]:
    va, vb = hl7_view(before), hl7_view(after)
    sa, sb = va.segments, vb.segments
    seps = _seps(sb) if sb else _seps(sa)
    counts_a: dict[str, int] = {}
    counts_b: dict[str, int] = {}
    for s in sa:
        counts_a[s.name] = counts_a.get(s.name, 0) + 1
    for s in sb:
        counts_b[s.name] = counts_b.get(s.name, 0) + 1

    def label(segment: Hl7Segment) -> str:
        if not segment.name:
            return f"line {segment.position}"
        many = max(counts_a.get(segment.name, 0), counts_b.get(segment.name, 0)) > 1
        return f"{segment.name}[{segment.sequence}]" if many else segment.name

    out: list[Change] = []

    def add(change: Change) -> None:
        _add(out, limit, change)

    matcher = difflib.SequenceMatcher(
        None, [_segment_key(s) for s in sa], [_segment_key(s) for s in sb], autojunk=False
    )
    try:
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal":
                continue
            old_block, new_block = list(sa[i1:i2]), list(sb[j1:j2])
            pairs: list[tuple[Hl7Segment | None, Hl7Segment | None]] = []
            for new_seg in new_block:  # the same segment changed: paired by name, in order
                match = next((s for s in old_block if s.name == new_seg.name and s.name), None)
                if match is not None:
                    old_block.remove(match)
                pairs.append((match, new_seg))
            pairs += [(old_seg, None) for old_seg in old_block]
            for old_seg, new_seg in pairs:
                if new_seg is None:
                    add(Change(label(old_seg), _cut(_segment_text(old_seg)), None, REMOVED))
                elif old_seg is None:
                    add(Change(label(new_seg), None, _cut(_segment_text(new_seg)), ADDED))
                else:
                    fa = {f.number: f for f in old_seg.fields}
                    fb = {f.number: f for f in new_seg.fields}
                    for number in sorted(fa.keys() | fb.keys()):
                        for change in _field_changes(label(new_seg), fa.get(number), fb.get(number), seps):
                            add(change)
    except _Full:
        pass
    return out


# --- the change list and the text diff ---------------------------------------------------------------


def changes(
    content_type: str, before: str | None, after: str | None, *, limit: int = MAX_CHANGES
) -> list[Change]:
    """The changed paths from `before` to `after` (at most `limit`), in document order. Empty when
    nothing changed, and when the content cannot be compared field by field (not JSON, too large):
    `review` says which. Never raises."""
    before, after = before or "", after or ""
    if before == after or max(len(before), len(after)) > MAX_FIELD_LEVEL_CHARS:
        return []
    if content_type == FHIR_JSON:
        a, b = _parse_json(before), _parse_json(after)
        if a is _NOT_JSON or b is _NOT_JSON:
            return []
        return _fhir_changes(a, b, limit)
    if content_type == HL7_ER7:
        if _too_many_segments(before, after):  # the field table stops there; the text diff does not
            return []
        return _hl7_changes(before, after, limit)
    return []


def _too_many_segments(*texts: str) -> bool:
    return any(len(_hl7_lines(t)) > MAX_SEGMENTS for t in texts)


def text_diff(
    content_type: str,
    before: str | None,
    after: str | None,
    *,
    before_label: str = "version 1 (original)",
    after_label: str = "corrected",
    context: int = 3,
) -> list[DiffLine]:
    """Unified diff of the normalised texts, line by line for the template."""
    lines = []
    for text in difflib.unified_diff(
        normalise(content_type, before).splitlines(),
        normalise(content_type, after).splitlines(),
        fromfile=before_label,
        tofile=after_label,
        lineterm="",
        n=context,
    ):
        if text.startswith(("---", "+++")) and len(lines) < 2:
            kind = "file"
        elif text.startswith("@@"):
            kind = "hunk"
        elif text.startswith("+"):
            kind = "add"
        elif text.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        lines.append(DiffLine(kind, text))
    return lines


def review(content_type: str, before: str | None, after: str | None) -> Review:
    """The change list (first MAX_CHANGES) and the normalised text diff of one correction."""
    found = changes(content_type, before, after, limit=MAX_CHANGES + 1)
    note = ""
    if not found and (before or "") != (after or ""):
        if max(len(before or ""), len(after or "")) > MAX_FIELD_LEVEL_CHARS or (
            content_type == HL7_ER7 and _too_many_segments(before or "", after or "")
        ):
            note = "too large to compare field by field; the text diff shows every change"
        elif content_type == FHIR_JSON and _NOT_JSON in (_parse_json(before or ""), _parse_json(after or "")):
            note = "not valid JSON, so no field-level list; the text diff shows every change"
        elif normalise(content_type, before) == normalise(content_type, after):
            note = (
                "no field differs: only the layout (whitespace, key order, line endings) or the bytes changed"
            )
    return Review(found[:MAX_CHANGES], len(found) > MAX_CHANGES, text_diff(content_type, before, after), note)


# --- where the issues point --------------------------------------------------------------------------

_INDEX = re.compile(r"\[\d+\]")


def _expression_path(expression: str) -> str:
    # FHIRPath functions (".where(...)", ".exists()") narrow the location; the part before is enough.
    expression = expression.strip()
    cut = expression.find("(")
    if cut != -1:
        expression = expression[:cut].rsplit(".", 1)[0]
    return expression


_LAST_STEP = re.compile(r"(\.[^.\[]+|\[\d+\])$")


def _parents(expression: str):
    while True:
        parent = _LAST_STEP.sub("", expression)
        if not parent or parent == expression:
            return
        yield parent
        expression = parent


def _fhir_targets(text: str, issues: Sequence[dict]) -> list[IssueTarget]:
    doc = _parse_json(text)
    lines = _json_lines(doc) if doc is not _NOT_JSON else []
    if not lines:
        return []
    first_line: dict[str, int] = {}
    loose: dict[str, int] = {}
    for number, (_, path) in enumerate(lines, start=1):
        first_line.setdefault(path, number)
        loose.setdefault(_INDEX.sub("", path), number)
    targets = []
    for n, issue in enumerate(issues, start=1):
        for raw in issue.get("expression") or []:
            expression = _expression_path(str(raw))
            if not expression:
                continue
            line = first_line.get(expression) or loose.get(_INDEX.sub("", expression))
            exact = line is not None
            for parent in _parents(expression):  # absent (a missing element): its nearest parent
                if line is not None:
                    break
                line = first_line.get(parent) or loose.get(_INDEX.sub("", parent))
            if line is not None:
                targets.append(IssueTarget(f"issue {n}", str(raw), line, exact=exact))
            break  # one target per issue: its first expression
    return targets


def _field_columns(line: str, segment: str, number: int) -> tuple[int, int]:
    """Columns of field `number` on an ER7 line (0, 0 when it is not there)."""
    if len(line) < 4:
        return 0, 0
    sep = line[3]
    header = segment in ("MSH", "FHS", "BHS")
    if header and number == 1:
        return 3, 4
    parts = line.split(sep)
    index = number - 1 if header else number
    if index >= len(parts) or index < 1:
        return 0, 0
    start = len(sep.join(parts[:index])) + 1
    return start, start + len(parts[index])


def _hl7_targets(text: str, issues: Sequence[dict], detail: str | None) -> list[IssueTarget]:
    lines = _hl7_lines(text)
    view = hl7_view("\r".join(lines), issues=issues, detail=detail)
    labels = [f"issue {n}" for n in range(1, len(issues) + 1)] + (["exception detail"] if detail else [])
    targets = []
    for label in labels:
        hit = None
        for segment in view.segments:
            flagged = next((f for f in segment.fields if label in f.flags), None)
            if flagged is not None:
                hit = (segment, flagged)
                break
            if any(flag.startswith(label + ":") for flag in segment.flags):
                hit = (segment, None)
                break
        if hit is None:
            continue
        segment, flagged = hit
        line_text = lines[segment.position - 1] if segment.position <= len(lines) else ""
        if flagged is not None:
            start, end = _field_columns(line_text, segment.name, flagged.number)
            targets.append(IssueTarget(label, flagged.position, segment.position, start, end))
        else:
            targets.append(IssueTarget(label, segment.name or f"line {segment.position}", segment.position))
    return targets


def issue_targets(
    content_type: str, text: str | None, issues: Sequence[dict], detail: str | None = None
) -> list[IssueTarget]:
    """The line (and columns) each issue points at in `text` as the correction editor holds it.
    Only when `text` is in normalised form (what the editor opens with): after the reviewer
    reflowed it, line numbers would be wrong, so there are none. Never raises."""
    text = (text or "").replace("\r\n", "\n")
    try:
        if not text or normalise(content_type, text) != text:
            return []
        if content_type == FHIR_JSON:
            return _fhir_targets(text, issues)
        if content_type == HL7_ER7:
            return _hl7_targets(text, issues, detail)
    except Exception:  # a viewer aid: an odd issue shape must not break the editor
        return []
    return []


@dataclass
class ExcerptLine:
    number: int
    text: str
    target: bool = False


@dataclass
class IssueExcerpt:
    """A few lines around an issue's target, for the read-only view above the editor."""

    target: IssueTarget
    lines: list[ExcerptLine] = field(default_factory=list)


def excerpts(text: str | None, targets: Sequence[IssueTarget], context: int = 2) -> list[IssueExcerpt]:
    """The lines around each target (`context` either side), the target line marked."""
    lines = (text or "").replace("\r\n", "\n").split("\n")
    out = []
    for target in targets:
        first, last = max(1, target.line - context), min(len(lines), target.line + context)
        out.append(
            IssueExcerpt(
                target,
                [ExcerptLine(n, _cut_line(lines[n - 1]), n == target.line) for n in range(first, last + 1)],
            )
        )
    return out


def _cut_line(line: str, width: int = 400) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"
