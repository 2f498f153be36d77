"""HL7 v2 over MLLP, the parts with no I/O (SPEC 4): framing, our MSH-10 on the wire, and what an
ACK means. python-hl7 parses; this module decides.

ACK rules: MSA-1 AA/CA → delivered; AE/CE and AR/CR → ehr_rejected (the receiver refused it), the
ERR segments naming the field (ERR-2 location → `PID-7`, ERR-3 code, ERR-8 text); an ACK that is
not one, or whose MSA-2 does not echo our MSH-10, → malformed_response (never success: it may
answer another message). No ACK at all is decided by the adapter: unknown_outcome.
"""

from __future__ import annotations

import re

from .delivery import AttemptOutcome, Category, Outcome

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"


def frame(payload: bytes) -> bytes:
    """One MLLP block: <VT> message <FS><CR>."""
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


def unframe(buffer: bytes) -> tuple[bytes | None, bytes]:
    """(the first complete message in `buffer` or None, the rest)."""
    start = buffer.find(START_BLOCK)
    if start < 0:
        return None, b""
    end = buffer.find(END_BLOCK + CARRIAGE_RETURN, start)
    if end < 0:
        return None, buffer[start:]
    return buffer[start + 1 : end], buffer[end + 2 :]


def segments(text: str) -> list[str]:
    return [s for s in re.split(r"\r\n|\r|\n", text) if s]


def separators(text: str) -> tuple[str, str, str]:
    """(field, component, repetition) separators from MSH-1/MSH-2, with the standard defaults."""
    if text.startswith("MSH") and len(text) >= 8:
        return text[3], text[4], text[5]
    return "|", "^", "~"


def msh_field(text: str, number: int) -> str:
    """MSH-n of a message ('' when absent). MSH-1 is the field separator itself."""
    first = segments(text)[0] if text else ""
    if not first.startswith("MSH") or len(first) < 4:
        return ""
    fields = first.split(first[3])
    index = number - 1
    return fields[index] if 0 < index < len(fields) else ""


def with_control_id(text: str, control_id: str) -> str:
    """The message with MSH-10 set to our control id: derived from the idempotency key, the same on
    every attempt and replay, so a careful receiver can de-duplicate on (MSH-3, MSH-4, MSH-10)."""
    lines = re.split(r"(\r\n|\r|\n)", text)
    first = lines[0]
    if not first.startswith("MSH") or len(first) < 4:
        return text
    sep = first[3]
    fields = first.split(sep)
    while len(fields) <= 9:
        fields.append("")
    fields[9] = control_id
    lines[0] = sep.join(fields)
    return "".join(lines)


def ack_outcome(ack_text: str, control_id: str, *, latency_ms: int = 0, summary: str = "") -> Outcome:
    """The Outcome an ACK stands for (module docstring)."""
    import hl7

    def not_trusted(detail: str) -> Outcome:
        """Anything but a clear AA/AE/AR for our MSH-10: it may have been applied, or not."""
        return Outcome(
            AttemptOutcome.UNKNOWN,
            Category.MALFORMED_RESPONSE,
            summary=summary,
            response_excerpt=ack_text[:2000],
            latency_ms=latency_ms,
            detail=detail,
        )

    try:
        message = hl7.parse(ack_text.replace("\r\n", "\r").replace("\n", "\r"))
        msa = message.segment("MSA")
    except Exception:  # python-hl7 raises several kinds for garbage: any of them means "not an ACK"
        return not_trusted(
            "the answer is not an HL7 ACK (no MSA segment): cannot tell whether it was applied"
        )
    code = str(msa[1]).strip() if len(msa) > 1 else ""
    echoed = str(msa[2]).strip() if len(msa) > 2 else ""
    if echoed != control_id:
        return not_trusted(
            f"ACK MSA-2 {echoed!r} does not echo our MSH-10 {control_id!r}: it may answer another "
            "message; cannot tell whether ours was applied"
        )
    if code in ("AA", "CA"):
        return Outcome(AttemptOutcome.DELIVERED, summary=summary, latency_ms=latency_ms, detail=f"ACK {code}")
    if code not in ("AE", "AR", "CE", "CR"):
        return not_trusted(f"ACK with unknown MSA-1 {code!r}: cannot tell whether it was applied")
    issues = [_err_issue(seg) for seg in message.segments("ERR")] if _has(message, "ERR") else []
    named = "; ".join(i["diagnostics"] for i in issues if i["diagnostics"]) or "no ERR segment"
    return Outcome(
        AttemptOutcome.REJECTED,
        Category.EHR_REJECTED,
        summary=summary,
        response_excerpt=ack_text[:2000],
        latency_ms=latency_ms,
        provably_not_applied=True,
        issues=issues,
        detail=f"ACK {code} ({'rejected' if code in ('AR', 'CR') else 'application error'}): {named}",
    )


def _has(message, name: str) -> bool:
    try:
        return bool(message.segments(name))
    except KeyError:
        return False


def _err_issue(err) -> dict:
    """One ERR segment as an issue: where (ERR-2 → `PID-7`), code (ERR-3), text (ERR-8 or ERR-3.2)."""

    def field(n: int) -> str:
        return str(err[n]).strip() if len(err) > n else ""

    location = field(2)
    parts = location.split("^")
    where = f"{parts[0]}-{parts[2]}" if len(parts) > 2 and parts[0] and parts[2] else parts[0]
    code_parts = field(3).split("^")
    text = field(8) or (code_parts[1] if len(code_parts) > 1 else "")
    return {
        "severity": {"E": "error", "W": "warning", "I": "information"}.get(field(4), "error"),
        "code": code_parts[0],
        "location": location,  # ERR-2 as sent (`OBX^2^5`): the viewer flags that OBX, not every one
        "expression": [where] if where else [],
        "diagnostics": f"{where}: {text}" if where and text else text or where,
    }
