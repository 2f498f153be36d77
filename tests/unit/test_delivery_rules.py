"""SPEC 2 and 3.2 rules that need no I/O: control ids, clinical risk, automatic-retry eligibility,
routing refusals."""

from hypothesis import given
from hypothesis import strategies as st

from app.domain.delivery import (
    AttemptOutcome,
    Category,
    ConnectionSettings,
    Outcome,
    auto_retry_eligible,
    clinical_risk,
    control_id_for,
    routing_refusal,
)

SETTINGS = ConnectionSettings(name="c", protocol="fhir-r4", endpoint="http://ehr")


@given(st.text(min_size=1, max_size=300))
def test_control_id_is_stable_and_fits_msh10(key):
    first = control_id_for(key)
    assert first == control_id_for(key)
    assert 1 <= len(first) <= 20 and first.isalnum() and first.isascii()


def test_different_keys_get_different_control_ids():
    assert len({control_id_for(f"order-{n}") for n in range(10_000)}) == 10_000


def test_medication_and_order_messages_are_high_risk():
    for message_type in ("MedicationRequest", "ServiceRequest", "ORM^O01", "RDE^O11", "OML^O21"):
        assert clinical_risk(message_type) == "high"
    for message_type in ("Observation", "Patient", "ADT^A08", "ORU^R01"):
        assert clinical_risk(message_type) == "normal"


def outcome(category, *, provably=False):
    return Outcome(AttemptOutcome.TRANSIENT, category, provably_not_applied=provably)


def test_only_transport_and_unavailable_are_retried_automatically():
    no_conditional = ConnectionSettings(
        name="c", protocol="fhir-r4", endpoint="e", supports_conditional_create=False
    )
    assert auto_retry_eligible(outcome(Category.TRANSPORT), no_conditional)
    assert auto_retry_eligible(outcome(Category.EHR_UNAVAILABLE, provably=True), no_conditional)
    # A 500 may have applied: retried only where conditional create protects against a duplicate.
    assert not auto_retry_eligible(outcome(Category.EHR_UNAVAILABLE), no_conditional)
    assert auto_retry_eligible(outcome(Category.EHR_UNAVAILABLE), SETTINGS)
    for category in set(Category) - {Category.TRANSPORT, Category.EHR_UNAVAILABLE}:
        assert not auto_retry_eligible(outcome(category, provably=True), SETTINGS), category


def test_routing_refusals():
    assert routing_refusal(SETTINGS, "MedicationRequest") is None
    disabled = ConnectionSettings(name="c", protocol="fhir-r4", endpoint="e", enabled=False)
    assert "disabled" in routing_refusal(disabled, "MedicationRequest")
    only_obs = ConnectionSettings(
        name="c", protocol="fhir-r4", endpoint="e", enabled_message_types=("Observation",)
    )
    assert "not enabled" in routing_refusal(only_obs, "MedicationRequest")
    assert routing_refusal(only_obs, "Observation") is None


def test_replay_waits_out_an_earlier_uncertain_requests_deadline_plus_grace():
    from datetime import datetime

    from app.domain.delivery import reconcile_not_before

    start = datetime(2026, 1, 1, 12, 0, 0)
    assert reconcile_not_before(None, 30, 15) is None  # nothing uncertain came before: go at once
    assert reconcile_not_before(start, 30, 15) == datetime(2026, 1, 1, 12, 0, 45)
    assert reconcile_not_before(start, 2.5, 0) == datetime(2026, 1, 1, 12, 0, 2, 500000)


# --- issue 6: retry backoff with full jitter --------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from app.domain.delivery import RETRY_CAP_SECONDS, retry_delay  # noqa: E402


def test_full_jitter_spans_zero_to_the_exponential_ceiling():
    assert retry_delay(30, 0, draw=0.0) == 0.0
    assert retry_delay(30, 0, draw=0.5) == 15.0
    assert retry_delay(30, 2, draw=0.5) == 60.0  # ceiling 120
    assert retry_delay(30, 40, draw=0.999) <= RETRY_CAP_SECONDS  # capped
    assert retry_delay(30, 1, draw=0.0, retry_after=45) == 45  # Retry-After is a floor
    assert retry_delay(30, 1, draw=0.0, retry_after=10**6) == RETRY_CAP_SECONDS  # …capped too


@given(
    base=st.floats(0, 600),
    n=st.integers(-3, 10_000),
    draw=st.floats(0, 1, exclude_max=True),
    after=st.none() | st.floats(0, 10**7),
)
def test_retry_delay_stays_within_its_bounds(base, n, draw, after):
    delay = retry_delay(base, n, retry_after=after, draw=draw)
    assert 0 <= delay <= RETRY_CAP_SECONDS
    assert delay <= max(
        min(RETRY_CAP_SECONDS, base * 2 ** min(max(n, 0), 40)), min(after or 0, RETRY_CAP_SECONDS)
    )
    if after:
        assert delay >= min(after, RETRY_CAP_SECONDS)
