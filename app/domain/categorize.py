"""Categorization of FHIR responses (SPEC 3.2): one function maps real signals to a category."""

from __future__ import annotations

import json

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
