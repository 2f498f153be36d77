"""Categorization of FHIR responses (SPEC 3.2): one function maps real signals to a category."""

from __future__ import annotations

import json
import re

from .delivery import Category

# OperationOutcome issue.code values that mean "your code system / value set is wrong".
_CODE_SET_ISSUES = {"code-invalid", "not-supported"}
_DUPLICATE_ISSUES = {"duplicate"}
_AUTH_ISSUES = {"security", "login", "unknown", "expired", "forbidden", "suppressed"}


def operation_outcome_issues(body: bytes | str | None) -> list[dict] | None:
    """Parse an OperationOutcome body into its issues; None when it is not one."""
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return None
    issues = doc.get("issue")
    if not isinstance(issues, list):
        return []
    return [
        {
            "severity": _text(i.get("severity")),
            "code": _text(i.get("code")),
            "diagnostics": _text(i.get("diagnostics")),
            "expression": _expressions(i.get("expression")),
        }
        for i in issues
        if isinstance(i, dict)
    ]


def _text(value) -> str:
    """EHRs send odd shapes: only a plain string counts."""
    return value if isinstance(value, str) else ""


def _expressions(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [e for e in value if isinstance(e, str)]
    return []


def categorize_fhir_status(status: int, issues: list[dict] | None) -> Category:
    """Category for a non-success FHIR HTTP response."""
    codes = {i.get("code") for i in (issues or []) if isinstance(i.get("code"), str)}
    if status in (401, 403):
        return Category.AUTH
    if status == 429 or status >= 500:
        return Category.EHR_UNAVAILABLE
    if status == 409 or codes & _DUPLICATE_ISSUES:
        return Category.DUPLICATE_SUSPECTED
    if status == 412:  # If-None-Exist matched several resources
        return Category.DUPLICATE_SUSPECTED
    if codes & _CODE_SET_ISSUES:
        return Category.CODE_SET
    if status in (404, 405) and not issues:
        return Category.CONFIG
    if 400 <= status < 500:
        return Category.EHR_REJECTED
    return Category.MALFORMED_RESPONSE


# An interface engine's own words about a failed message (POST /api/v1/exceptions), matched in
# order: the first row that matches names the category and whether the EHR may have applied it.
# Anything we cannot place is unknown_outcome: reconcile (or have a lead confirm) before re-sending.
_REPORTED_ERROR_RULES: tuple[tuple[re.Pattern, Category, bool], ...] = tuple(
    (re.compile(pattern, flags), category, may_have_applied)
    for pattern, flags, category, may_have_applied in (
        (r"MSA\|(AE|AR|CE|CR)\b", 0, Category.EHR_REJECTED, False),  # a quoted HL7 ACK speaks first
        (r"\b40[13]\b|unauthori[sz]ed|forbidden|access denied|(invalid|expired) (access )?token|"
         r"authenticat", re.I, Category.AUTH, False),
        (r"icd-?9|icd-?10|code ?system|unknown code|invalid code|value ?set|terminology",
         re.I, Category.CODE_SET, False),
        (r"duplicate|already exists|already (been )?processed", re.I, Category.DUPLICATE_SUSPECTED, True),
        (r"pars(e|ing) (error|fail)|could not parse|cannot parse|unparseable|encoding|"
         r"invalid (character|byte)|malformed (message|hl7|segment|payload)", re.I, Category.DATA_SHAPE, False),
        (r"timed? ?out|no (ack|acknowledg|response|reply)|connection (reset|closed|dropped|aborted)|"
         r"broken pipe|unexpected eof", re.I, Category.UNKNOWN_OUTCOME, True),
        (r"connection refused|econnrefused|no route to host|host unreachable|name or service not known|"
         r"\bdns\b|getaddrinfo|\btls\b|\bssl\b|certificate|could not connect|unable to connect",
         re.I, Category.TRANSPORT, False),
        (r"\b(503|429)\b|too many requests|throttl|temporarily unavailable", re.I, Category.EHR_UNAVAILABLE, False),
        (r"\b5\d\d\b|unavailable|internal server error", re.I, Category.EHR_UNAVAILABLE, True),
        (r"\b(AE|AR|CE|CR)\b", 0, Category.EHR_REJECTED, False),  # HL7 ACK codes, upper case only
        (r"\b4\d\d\b|reject|application error|validation|invalid|not allowed|required field",
         re.I, Category.EHR_REJECTED, False),
    )
)  # fmt: skip


def categorize_reported_error(error: str) -> tuple[Category, bool]:
    """(category, whether the EHR may have applied it) for an error an interface engine reported."""
    for pattern, category, may_have_applied in _REPORTED_ERROR_RULES:
        if pattern.search(error):
            return category, may_have_applied
    return Category.UNKNOWN_OUTCOME, True
