"""fhir_r4.classify is table-driven (issue 6): every HTTP status 100–599 has a row in every phase,
and what classify returns is what that row says — whatever the body and headers."""

from __future__ import annotations

import json

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from app.adapters.ehr.fhir_r4 import CREATE, METADATA, SEARCH, TOKEN, classify, status_rule
from app.domain.delivery import AttemptOutcome, Category

PHASES = (CREATE, METADATA, TOKEN, SEARCH)
BODIES = (
    b"",
    b"not json",
    json.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "duplicate"}]}
    ).encode(),
    json.dumps({"resourceType": "MedicationRequest", "id": "m1"}).encode(),
)


def test_every_status_from_100_to_599_has_a_row_in_every_phase():
    for phase in PHASES:
        for status in range(100, 600):
            status_rule(status, phase)  # LookupError fails the test


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(100, 599),
    phase=st.sampled_from(PHASES),
    body=st.sampled_from(BODIES),
    retry_after=st.sampled_from([None, "5"]),
)
def test_classify_answers_what_the_row_says(status, phase, body, retry_after):
    headers = {"Retry-After": retry_after} if retry_after else {}
    response = httpx.Response(
        status,
        content=body,
        headers=headers,
        request=httpx.Request("POST", "http://ehr/fhir/MedicationRequest"),
    )
    outcome = classify(
        phase=phase, summary="POST", started=0.0, response=response, resource_type="MedicationRequest"
    )
    rule = status_rule(status, phase)
    assert outcome.status_code == status
    if phase != CREATE:  # a preflight never carried the message
        assert outcome.provably_not_applied and outcome.outcome is not AttemptOutcome.DELIVERED
    if rule.outcome is AttemptOutcome.DELIVERED:  # a 2xx to create: the body decides
        assert outcome.outcome in (AttemptOutcome.DELIVERED, AttemptOutcome.UNKNOWN)
        return
    assert outcome.outcome is rule.outcome
    assert outcome.provably_not_applied is rule.not_applied
    if rule.category is not None:
        assert outcome.category is rule.category
    # only transport and EHR-unavailable answers are ever retryable (SPEC 3.2)
    if outcome.outcome is AttemptOutcome.TRANSIENT:
        assert outcome.category is Category.EHR_UNAVAILABLE and (status == 429 or status >= 500)
    assert outcome.retry_after_seconds == (5.0 if retry_after and rule.answer else None)
