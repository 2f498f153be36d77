"""Payload viewers: FHIR JSON with OperationOutcome issues highlighted, HL7 v2 as a field table.

Pure functions over text; the caller decides whether the viewer may see the payload (and audits it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_INDEX = re.compile(r"\[\d+\]")


# --- FHIR -----------------------------------------------------------------------------------------


@dataclass
class JsonLine:
    text: str
    path: str  # FHIRPath-like location of the value on this line, e.g. Patient.name[0].given[1]
    issues: list[int] = field(default_factory=list)  # 1-based numbers of the issues that point here


def _emit(value, path: str, depth: int, prefix: str, comma: str, out: list[JsonLine]) -> None:
    pad = "  " * depth
    if isinstance(value, dict) and value:
        out.append(JsonLine(f"{pad}{prefix}{{", path))
        items = list(value.items())
        for i, (key, child) in enumerate(items):
            _emit(
                child,
                f"{path}.{key}",
                depth + 1,
                json.dumps(key) + ": ",
                "," if i < len(items) - 1 else "",
                out,
            )
        out.append(JsonLine(f"{pad}}}{comma}", path))
    elif isinstance(value, list) and value:
        out.append(JsonLine(f"{pad}{prefix}[", path))
        for i, child in enumerate(value):
            _emit(child, f"{path}[{i}]", depth + 1, "", "," if i < len(value) - 1 else "", out)
        out.append(JsonLine(f"{pad}]{comma}", path))
    else:
        out.append(JsonLine(f"{pad}{prefix}{json.dumps(value, ensure_ascii=False)}{comma}", path))


def _normalise_expression(expression: str) -> str:
    # FHIRPath functions (".where(...)", ".exists()") narrow the location; the part before is enough.
    expression = expression.strip()
    cut = expression.find("(")
    if cut != -1:
        expression = expression[:cut].rsplit(".", 1)[0]
    return expression


def _points_at(path: str, expression: str) -> bool:
    for p, e in ((path, expression), (_INDEX.sub("", path), _INDEX.sub("", expression))):
        if p == e or p.startswith(e + ".") or p.startswith(e + "["):
            return True
    return False


def fhir_lines(text: str, issues: list[dict]) -> list[JsonLine] | None:
    """Pretty-printed JSON lines with the issues whose `expression` points at them; None if not JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    root = doc.get("resourceType", "$") if isinstance(doc, dict) else "$"
    lines: list[JsonLine] = []
    _emit(doc, str(root), 0, "", "", lines)
    for number, issue in enumerate(issues, start=1):
        for expression in issue.get("expression") or []:
            expression = _normalise_expression(str(expression))
            if not expression:
                continue
            for line in lines:
                if _points_at(line.path, expression) and number not in line.issues:
                    line.issues.append(number)
    return lines


# HL7 v2 segments and fields are parsed in the domain: app/domain/hl7_view.py.

# --- corrections: what changed is app/domain/payload_diff.py -------------------------------------


def normalise_edited(text: str, content_type: str) -> str:
    """Browsers submit textareas with CRLF; HL7 v2 separates segments with CR only."""
    lines = text.splitlines()
    if content_type == "x-application/hl7-v2+er7":
        return "\r".join(lines)
    return "\n".join(lines)
