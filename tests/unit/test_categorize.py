"""app.domain.categorize: FHIR status + OperationOutcome -> category (SPEC 3.2)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.categorize import categorize_fhir_status, operation_outcome_issues
from app.domain.delivery import Category

# FHIR R4 IssueType codes plus a few strings no server should send.
ISSUE_CODES = [
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict", "transient",
    "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational", "", "???",
]  # fmt: skip


def oo(*issues: dict) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": list(issues)}).encode()


def issue(code: str, **kw) -> dict:
    return {"severity": "error", "code": code, **kw}


# --------------------------------------------------------------------------- categorize_fhir_status


@pytest.mark.parametrize(
    ("status", "codes", "expected"),
    [
        (401, None, Category.AUTH),
        (401, ["expired"], Category.AUTH),
        (403, ["forbidden"], Category.AUTH),
        (403, ["duplicate"], Category.AUTH),  # status wins over the issue code
        (429, None, Category.EHR_UNAVAILABLE),
        (429, ["throttled"], Category.EHR_UNAVAILABLE),
        (500, ["exception"], Category.EHR_UNAVAILABLE),
        (502, None, Category.EHR_UNAVAILABLE),
        (503, ["transient"], Category.EHR_UNAVAILABLE),
        (503, ["code-invalid"], Category.EHR_UNAVAILABLE),  # 5xx is never a data problem
        (504, None, Category.EHR_UNAVAILABLE),
        (409, None, Category.DUPLICATE_SUSPECTED),
        (409, ["conflict"], Category.DUPLICATE_SUSPECTED),
        (412, ["multiple-matches"], Category.DUPLICATE_SUSPECTED),
        (400, ["duplicate"], Category.DUPLICATE_SUSPECTED),
        (422, ["duplicate"], Category.DUPLICATE_SUSPECTED),
        (422, ["code-invalid"], Category.CODE_SET),
        (400, ["not-supported"], Category.CODE_SET),
        (422, ["required", "code-invalid"], Category.CODE_SET),  # any code-set issue makes it code_set
        (404, None, Category.CONFIG),
        (404, [], Category.CONFIG),
        (405, None, Category.CONFIG),
        (404, ["not-found"], Category.EHR_REJECTED),
        (400, None, Category.EHR_REJECTED),
        (400, ["structure"], Category.EHR_REJECTED),
        (422, ["invalid"], Category.EHR_REJECTED),
        (422, ["required"], Category.EHR_REJECTED),
        (422, ["business-rule"], Category.EHR_REJECTED),
        (410, ["deleted"], Category.EHR_REJECTED),
        (499, None, Category.EHR_REJECTED),
        (302, None, Category.MALFORMED_RESPONSE),  # not an error status at all
    ],
)
def test_category_table(status: int, codes: list[str] | None, expected: Category) -> None:
    issues = None if codes is None else [issue(c) for c in codes]
    assert categorize_fhir_status(status, issues) is expected


def test_only_transport_and_unavailable_statuses_are_unavailable() -> None:
    for status in range(400, 600):
        category = categorize_fhir_status(status, None)
        assert (category is Category.EHR_UNAVAILABLE) == (status == 429 or status >= 500), status


normalized_issue = st.fixed_dictionaries(
    {
        "severity": st.sampled_from(["fatal", "error", "warning", "information", ""]),
        "code": st.one_of(st.sampled_from(ISSUE_CODES), st.text(max_size=20)),
        "diagnostics": st.text(max_size=50),
        "expression": st.lists(st.text(max_size=30), max_size=3),
    }
)
loose_issue = st.dictionaries(
    st.sampled_from(["severity", "code", "diagnostics", "expression", "details", "location"]),
    st.one_of(st.none(), st.text(max_size=20), st.sampled_from(ISSUE_CODES), st.integers()),
    max_size=6,
)


@settings(max_examples=400, database=None, deadline=None)
@given(
    status=st.integers(min_value=400, max_value=599),
    issues=st.one_of(st.none(), st.lists(st.one_of(normalized_issue, loose_issue), max_size=6)),
)
def test_categorize_never_raises_and_returns_a_category(status: int, issues: list[dict] | None) -> None:
    category = categorize_fhir_status(status, issues)
    assert isinstance(category, Category)
    # 4xx/5xx always land in a category a human or the retry policy understands.
    assert category is not Category.MALFORMED_RESPONSE
    if status in (401, 403):
        assert category is Category.AUTH
    if status == 429 or status >= 500:
        assert category is Category.EHR_UNAVAILABLE


@settings(max_examples=200, database=None, deadline=None)
@given(
    status=st.integers(min_value=400, max_value=599), codes=st.lists(st.sampled_from(ISSUE_CODES), max_size=5)
)
def test_categorize_accepts_what_the_parser_produces(status: int, codes: list[str]) -> None:
    issues = operation_outcome_issues(oo(*(issue(c) for c in codes)))
    assert issues is not None
    assert isinstance(categorize_fhir_status(status, issues), Category)


# --------------------------------------------------------------------------- operation_outcome_issues


@pytest.mark.parametrize(
    "body",
    [
        None,
        b"",
        "",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1,2]",
        b'"text"',
        b'{"resourceType": "Patient"}',
        b"{}",
    ],
)
def test_not_an_operation_outcome(body) -> None:
    assert operation_outcome_issues(body) is None


def test_operation_outcome_without_issue_list() -> None:
    assert operation_outcome_issues(b'{"resourceType": "OperationOutcome"}') == []
    assert operation_outcome_issues(b'{"resourceType": "OperationOutcome", "issue": {"code": "x"}}') == []


def test_issues_are_normalized() -> None:
    body = oo(
        issue(
            "required", diagnostics="dosage missing", expression=["MedicationRequest.dosageInstruction", 7]
        ),
        {"code": "invalid"},
        "not-a-dict",
    )
    assert operation_outcome_issues(body) == [
        {
            "severity": "error",
            "code": "required",
            "diagnostics": "dosage missing",
            "expression": ["MedicationRequest.dosageInstruction"],
        },
        {"severity": "", "code": "invalid", "diagnostics": "", "expression": []},
    ]
    assert operation_outcome_issues(body.decode()) == operation_outcome_issues(body)


@settings(max_examples=200, database=None, deadline=None)
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_parser_never_raises_on_arbitrary_json_that_is_not_an_operation_outcome(doc) -> None:
    if isinstance(doc, dict):
        doc.pop("resourceType", None)
    assert operation_outcome_issues(json.dumps(doc)) is None


def test_parser_tolerates_a_non_list_expression() -> None:
    assert operation_outcome_issues(oo(issue("invalid", expression=5))) == [
        {"severity": "error", "code": "invalid", "diagnostics": "", "expression": []}
    ]
    assert operation_outcome_issues(oo(issue("invalid", expression="X.y")))[0]["expression"] == ["X.y"]


def test_parser_survives_deep_nesting() -> None:
    assert operation_outcome_issues("[" * 100_000 + "]" * 100_000) is None


# An interface engine's error text (POST /api/v1/exceptions) → (category, may the EHR have applied it).
REPORTED_ERRORS = [
    ("MSA|AE|CTRL0001\rERR||PID^1^7|101", "ehr_rejected", False),
    ("MSA|AR|CTRL0001", "ehr_rejected", False),
    ("ACK received: AR (application reject)", "ehr_rejected", False),
    ("HTTP 422 Unprocessable Entity: invalid dosage", "ehr_rejected", False),
    ("HTTP 401 Unauthorized", "auth", False),
    ("token expired; expired token refused by the EHR", "auth", False),
    ("ICD-9 code 250.00 where ICD-10 is expected", "code_set", False),
    ("unknown code system http://example.org/local", "code_set", False),
    ("Duplicate message control id", "duplicate_suspected", True),
    ("Could not parse segment PID at byte 112", "data_shape", False),
    ("invalid character in PID-5", "data_shape", False),
    ("Read timed out after 30000 ms", "unknown_outcome", True),
    ("No ACK received within 30 s", "unknown_outcome", True),
    ("Connection reset by peer after sending", "unknown_outcome", True),
    ("Connection refused (10.0.0.5:2575)", "transport", False),
    ("getaddrinfo failed for ehr.example.org", "transport", False),
    ("TLS handshake failed: certificate expired", "transport", False),
    ("HTTP 503 Service Unavailable", "ehr_unavailable", False),
    ("HTTP 429 Too Many Requests", "ehr_unavailable", False),
    ("HTTP 500 Internal Server Error", "ehr_unavailable", True),
    ("something nobody has seen before", "unknown_outcome", True),
]


@pytest.mark.parametrize(("error", "category", "may_have_applied"), REPORTED_ERRORS)
def test_reported_error_text_is_categorized(error, category, may_have_applied):
    from app.domain.categorize import categorize_reported_error

    assert categorize_reported_error(error) == (category, may_have_applied)
