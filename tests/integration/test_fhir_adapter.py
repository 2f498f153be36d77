"""FhirR4Adapter against the real simulated EHR: every category from real signals (SPEC 3.2, 4)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from app.adapters.ehr import AdapterError, ConfigError, FhirR4Adapter, adapter_for, classify
from app.adapters.ehr.fhir_r4 import CREATE, TOKEN, if_none_exist, retry_after_seconds
from app.domain.delivery import AttemptOutcome, Category, ConnectionSettings, Envelope, auto_retry_eligible
from app.simulator import SimServer
from tests.samples_fhir import (
    DELIVERY_SYSTEM,
    ICD9,
    MEDICATION_REQUEST,
    as_json,
    medication_request,
    patient,
    without,
)

MR = "MedicationRequest"


def envelope(
    resource: dict | str, *, key: str | None = None, message_type: str | None = None, **kw
) -> Envelope:
    """An Envelope for a resource (or raw payload text) with a fresh delivery key."""
    payload = resource if isinstance(resource, str) else as_json(resource)
    if message_type is None:
        message_type = resource["resourceType"] if isinstance(resource, dict) else MR
    key = key or f"key-{uuid.uuid4().hex}"
    return Envelope(
        message_id=kw.pop("message_id", f"msg-{key}"),
        message_type=message_type,
        content_type=kw.pop("content_type", "application/fhir+json"),
        payload=payload,
        delivery_system=kw.pop("delivery_system", DELIVERY_SYSTEM),
        delivery_value=key,
        control_id="R" + key[-19:],
    )


def ident(env: Envelope) -> str:
    return f"{env.delivery_system}|{env.delivery_value}"


@pytest.fixture
def make_adapter(sim: SimServer, tenant: str) -> Iterator[Callable[..., FhirR4Adapter]]:
    """Factory for adapters on the fresh tenant (short timeouts); all closed after the test."""
    made: list[FhirR4Adapter] = []

    def make(
        *, endpoint: str | None = None, client: httpx.Client | None = None, **overrides
    ) -> FhirR4Adapter:
        values = {
            "name": f"conn-{tenant}",
            "protocol": "fhir-r4",
            "endpoint": endpoint or sim.tenant_url(tenant),
            "connect_timeout": 1.0,
            "read_timeout": 2.0,
        }
        values.update(overrides)
        adapter = adapter_for(ConnectionSettings(**values), client=client)
        assert isinstance(adapter, FhirR4Adapter)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


@pytest.fixture
def adapter(make_adapter) -> FhirR4Adapter:
    return make_adapter()


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --------------------------------------------------------------------------- delivered


def test_delivered_201(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    env = envelope(medication_request(1))
    outcome = adapter.deliver(env)
    assert outcome.outcome is AttemptOutcome.DELIVERED, outcome.detail
    assert outcome.delivered and outcome.category is None
    assert outcome.status_code == 201
    assert outcome.resource_ref and outcome.resource_ref.startswith("MedicationRequest/")
    assert outcome.summary == f"POST {sim.tenant_url(tenant)}/MedicationRequest MedicationRequest"
    assert outcome.response_excerpt.startswith("{")
    assert outcome.latency_ms >= 0
    stored = sim.applied(tenant, ident(env))
    assert stored["count"] == 1
    # The delivery identifier was added next to the placer order number.
    body = json.loads(outcome.response_excerpt)
    assert {"system": DELIVERY_SYSTEM, "value": env.delivery_value} in body["identifier"]
    assert len(body["identifier"]) == 2


def test_existing_delivery_identifier_is_not_added_twice(adapter: FhirR4Adapter, sim, tenant) -> None:
    key = f"key-{uuid.uuid4().hex}"
    resource = medication_request(2)
    resource["identifier"].append({"system": DELIVERY_SYSTEM, "value": key})
    outcome = adapter.deliver(envelope(resource, key=key))
    assert outcome.delivered
    identifiers = json.loads(outcome.response_excerpt)["identifier"]
    assert [i for i in identifiers if i["system"] == DELIVERY_SYSTEM] == [
        {"system": DELIVERY_SYSTEM, "value": key}
    ]


def test_different_delivery_identifier_in_payload_is_data_shape(adapter: FhirR4Adapter, sim, tenant) -> None:
    resource = medication_request(3)
    resource["identifier"].append({"system": DELIVERY_SYSTEM, "value": "someone-elses-key"})
    outcome = adapter.deliver(envelope(resource))
    assert outcome.category is Category.DATA_SHAPE
    assert sim.requests(tenant)["all_requests"] == 0


def test_other_resource_types_are_delivered(adapter: FhirR4Adapter) -> None:
    outcome = adapter.deliver(envelope(patient(4)))
    assert outcome.delivered and outcome.resource_ref.startswith("Patient/")


def test_create_returns_200_is_still_delivered(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    sim.set_profile(tenant, "cerner-like", latency_ms=0)
    outcome = adapter.deliver(envelope(medication_request(5)))
    assert outcome.outcome is AttemptOutcome.DELIVERED
    assert outcome.status_code == 200
    assert outcome.resource_ref


# --------------------------------------------------------------------------- rejected by the EHR


def test_rejection_422_with_operation_outcome(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    sim.set_profile(tenant, rate_reject=1.0)
    outcome = adapter.deliver(envelope(medication_request(6)))
    assert outcome.outcome is AttemptOutcome.REJECTED
    assert outcome.category is Category.EHR_REJECTED
    assert outcome.status_code == 422
    assert outcome.issues and outcome.issues[0]["code"] == "invalid"
    assert "422" in outcome.detail and "invalid" in outcome.detail
    assert '"OperationOutcome"' in outcome.response_excerpt
    assert sim.applied(tenant)["total"] == 0


def test_required_field_quirk(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    sim.set_profile(tenant, "epic-like", latency_ms=0)
    outcome = adapter.deliver(envelope(without(medication_request(7), "dosageInstruction")))
    assert outcome.category is Category.EHR_REJECTED
    issue = outcome.issues[0]
    assert issue["code"] == "required"
    assert issue["expression"] == ["MedicationRequest.dosageInstruction"]
    assert "dosageInstruction" in outcome.detail
    # The full sample satisfies the vendor's extra requirements.
    assert adapter.deliver(envelope(medication_request(7))).delivered


def test_code_system_rejection_is_code_set(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    sim.set_profile(tenant, "icd9-strict")
    resource = medication_request(8)
    resource["reasonCode"] = [{"coding": [{"system": ICD9, "code": "401.9", "display": "Hypertension NOS"}]}]
    outcome = adapter.deliver(envelope(resource))
    assert outcome.outcome is AttemptOutcome.REJECTED
    assert outcome.category is Category.CODE_SET
    assert outcome.issues[0]["code"] == "code-invalid"


def test_expired_token_is_auth(adapter: FhirR4Adapter, sim: SimServer, tenant: str) -> None:
    sim.set_profile(tenant, "expired-token")
    outcome = adapter.deliver(envelope(medication_request(9)))
    assert outcome.category is Category.AUTH
    assert outcome.status_code == 401
    assert outcome.provably_not_applied
    assert outcome.issues[0]["code"] == "expired"


# --------------------------------------------------------------------------- unavailable, transport


@pytest.mark.parametrize(("preset", "status"), [("unavailable", 503), ("throttled", 429)])
def test_503_and_429_are_unavailable_and_provably_not_applied(
    make_adapter, sim, tenant, preset, status
) -> None:
    sim.set_profile(tenant, preset, retry_after_seconds=3)
    adapter = make_adapter()
    outcome = adapter.deliver(envelope(medication_request(10)))
    assert outcome.outcome is AttemptOutcome.TRANSIENT
    assert outcome.category is Category.EHR_UNAVAILABLE
    assert outcome.status_code == status
    assert outcome.provably_not_applied
    assert outcome.retry_after_seconds == 3.0
    assert auto_retry_eligible(outcome, adapter.settings)
    assert sim.applied(tenant)["total"] == 0


def test_500_is_unavailable_but_not_provably_not_applied(make_adapter, sim, tenant) -> None:
    sim.set_profile(tenant, "flapping-500")
    adapter = make_adapter(supports_conditional_create=False)
    outcome = adapter.deliver(envelope(medication_request(11)))
    assert outcome.outcome is AttemptOutcome.TRANSIENT
    assert outcome.category is Category.EHR_UNAVAILABLE
    assert outcome.status_code == 500
    assert not outcome.provably_not_applied
    # Without conditional create a 500 must not be retried blindly.
    assert not auto_retry_eligible(outcome, adapter.settings)


def test_connection_refused_is_transport(make_adapter, closed_port: int) -> None:
    adapter = make_adapter(endpoint=f"http://127.0.0.1:{closed_port}/fhir/nowhere")
    outcome = adapter.deliver(envelope(medication_request(12)))
    assert outcome.outcome is AttemptOutcome.TRANSIENT
    assert outcome.category is Category.TRANSPORT
    assert outcome.provably_not_applied
    assert outcome.status_code is None
    assert outcome.summary.startswith(f"POST http://127.0.0.1:{closed_port}/fhir/nowhere/MedicationRequest")
    assert auto_retry_eligible(outcome, adapter.settings)


# --------------------------------------------------------------------------- unknown outcomes


def test_commit_then_drop_is_unknown_and_applied_once(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, "drop-after-commit")
    env = envelope(medication_request(13))
    outcome = adapter.deliver(env)
    assert outcome.outcome is AttemptOutcome.UNKNOWN
    assert outcome.category is Category.UNKNOWN_OUTCOME
    assert not outcome.provably_not_applied
    assert sim.applied(tenant, ident(env))["count"] == 1
    # Reconciliation finds it, so a replay is not needed.
    assert adapter.find_applied(env) is True


def test_connection_reset_is_unknown_and_not_applied(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, "reset")
    env = envelope(medication_request(14))
    outcome = adapter.deliver(env)
    assert outcome.category is Category.UNKNOWN_OUTCOME
    assert sim.requests(tenant)["by_identifier"][ident(env)] == 1
    assert adapter.find_applied(env) is False


def test_read_timeout_is_unknown_and_the_ehr_still_applies(make_adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, latency_ms=400)
    adapter = make_adapter(read_timeout=0.1)
    env = envelope(medication_request(15))
    outcome = adapter.deliver(env)
    assert outcome.outcome is AttemptOutcome.UNKNOWN
    assert outcome.category is Category.UNKNOWN_OUTCOME
    assert "ReadTimeout" in outcome.detail
    assert wait_for(lambda: sim.applied(tenant, ident(env))["count"] == 1)


def test_malformed_201_is_malformed_response(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, "malformed")
    env = envelope(medication_request(16))
    outcome = adapter.deliver(env)
    assert outcome.outcome is AttemptOutcome.UNKNOWN
    assert outcome.category is Category.MALFORMED_RESPONSE
    assert outcome.status_code == 201
    assert sim.applied(tenant, ident(env))["count"] == 1


# --------------------------------------------------------------------------- idempotency on the wire


def test_conditional_create_prevents_a_duplicate(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    env = envelope(medication_request(17))
    first, second = adapter.deliver(env), adapter.deliver(env)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.delivered and second.resource_ref == first.resource_ref
    assert sim.applied(tenant, ident(env))["count"] == 1
    assert sim.requests(tenant)["by_identifier"][ident(env)] == 2


def test_ignored_if_none_exist_creates_a_duplicate(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    """Why duplicate detection must happen in the service, before forwarding (SPEC 2)."""
    sim.set_profile(tenant, "legacy-ignores-conditional")
    env = envelope(medication_request(18))
    assert adapter.deliver(env).delivered
    assert adapter.deliver(env).delivered
    assert sim.applied(tenant, ident(env))["count"] == 2


def test_no_if_none_exist_without_conditional_create_support(make_adapter, sim: SimServer, tenant) -> None:
    adapter = make_adapter(supports_conditional_create=False)
    env = envelope(medication_request(19))
    adapter.deliver(env)
    adapter.deliver(env)
    assert sim.applied(tenant, ident(env))["count"] == 2


def test_several_matches_is_duplicate_suspected(adapter: FhirR4Adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, "legacy-ignores-conditional")
    env = envelope(medication_request(20))
    adapter.deliver(env)
    adapter.deliver(env)
    sim.set_profile(tenant, "default")
    outcome = adapter.deliver(env)
    assert outcome.outcome is AttemptOutcome.REJECTED
    assert outcome.category is Category.DUPLICATE_SUSPECTED
    assert outcome.status_code == 412
    assert not outcome.provably_not_applied


def test_request_headers(make_adapter, sim: SimServer, tenant: str) -> None:
    seen: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [seen.append]}) as client:
        adapter = make_adapter(client=client)
        env = envelope(medication_request(21))
        assert adapter.deliver(env).delivered
        adapter.close()
        assert not client.is_closed  # an injected client belongs to the caller
    assert [(r.method, r.url.path) for r in seen] == [
        ("GET", f"/fhir/{tenant}/metadata"),
        ("POST", f"/fhir/{tenant}/MedicationRequest"),
    ]
    post = seen[1].headers
    assert post["Content-Type"] == "application/fhir+json"
    assert post["Accept"] == "application/fhir+json"
    assert post["If-None-Exist"] == if_none_exist(DELIVERY_SYSTEM, env.delivery_value)
    assert post["If-None-Exist"] == f"identifier={DELIVERY_SYSTEM}|{env.delivery_value}"
    assert post["X-Idempotency-Key"] == env.delivery_value
    assert post["X-Request-Id"] == env.delivery_value
    assert "Authorization" not in post


# --------------------------------------------------------------------------- our side: data shape, config


@pytest.mark.parametrize(
    ("resource", "expected_codes"),
    [
        (without(MEDICATION_REQUEST, "status", "intent"), {"required"}),
        (without(MEDICATION_REQUEST, "subject"), {"required"}),
        ({**MEDICATION_REQUEST, "dosageInstruction": {"text": "daily"}}, {"structure"}),
        ({**MEDICATION_REQUEST, "authoredOn": "yesterday"}, {"value"}),
        ({**MEDICATION_REQUEST, "status": 7}, {"structure"}),
        ({**MEDICATION_REQUEST, "favouriteColour": "blue"}, {"structure"}),
    ],
    ids=[
        "no-status-intent",
        "no-subject",
        "dosage-not-list",
        "bad-datetime",
        "status-int",
        "unknown-element",
    ],
)
def test_invalid_resource_is_data_shape_and_nothing_is_sent(
    adapter, sim, tenant, resource, expected_codes
) -> None:
    outcome = adapter.deliver(envelope(resource))
    assert outcome.outcome is AttemptOutcome.REJECTED
    assert outcome.category is Category.DATA_SHAPE
    assert outcome.provably_not_applied
    assert {i["code"] for i in outcome.issues} == expected_codes
    assert all(i["expression"][0].startswith("MedicationRequest") for i in outcome.issues)
    assert "FHIR R4B validation" in outcome.detail
    assert sim.requests(tenant)["all_requests"] == 0  # not even the metadata check


def test_missing_status_and_intent_are_both_named(adapter: FhirR4Adapter) -> None:
    outcome = adapter.deliver(envelope(without(MEDICATION_REQUEST, "status", "intent")))
    expressions = {i["expression"][0] for i in outcome.issues}
    assert expressions == {"MedicationRequest.status", "MedicationRequest.intent"}


@pytest.mark.parametrize(
    ("payload", "message_type", "fragment"),
    [
        ("{not json", MR, "not valid JSON"),
        ("[1, 2, 3]", MR, "not a FHIR resource object"),
        ('{"status": "active"}', MR, "no resourceType"),
        (as_json(patient(1)), MR, "is a Patient"),
        ('{"resourceType": "Spaceship"}', "Spaceship", "not a FHIR R4 resource type"),
        ('{"resourceType": "Coding", "code": "x"}', "Coding", "data type"),
        ('{"resourceType": "MedicationRequest", "status": NaN}', MR, "not valid JSON"),
    ],
    ids=["not-json", "array", "no-type", "type-mismatch", "unknown-type", "data-type", "nan"],
)
def test_unparseable_payload_is_data_shape(adapter, sim, tenant, payload, message_type, fragment) -> None:
    outcome = adapter.deliver(envelope(payload, message_type=message_type))
    assert outcome.category is Category.DATA_SHAPE
    assert fragment in outcome.detail
    assert sim.requests(tenant)["all_requests"] == 0


def test_payload_with_bom_is_accepted(adapter: FhirR4Adapter) -> None:
    assert adapter.deliver(envelope("\ufeff" + as_json(medication_request(22)))).delivered


def test_fhir_version_mismatch_is_config_and_nothing_is_sent(adapter, sim: SimServer, tenant) -> None:
    sim.set_profile(tenant, "r4b")
    outcome = adapter.deliver(envelope(medication_request(23)))
    assert outcome.outcome is AttemptOutcome.REJECTED
    assert outcome.category is Category.CONFIG
    assert outcome.detail == "EHR reports fhirVersion 4.3.0, connection pinned to 4.0.1"
    assert outcome.provably_not_applied
    assert sim.requests(tenant) == {
        "by_identifier": {},
        "without_identifier": 0,
        "total": 0,
        "all_requests": 1,
    }


def test_version_is_checked_once_per_adapter(make_adapter, sim: SimServer, tenant) -> None:
    adapter = make_adapter()
    for n in range(3):
        assert adapter.deliver(envelope(medication_request(24 + n))).delivered
    assert sim.requests(tenant)["all_requests"] == 4  # one metadata + three creates


def test_metadata_unreachable_is_transport(make_adapter, closed_port: int) -> None:
    adapter = make_adapter(endpoint=f"http://127.0.0.1:{closed_port}/fhir/x")
    outcome = adapter.deliver(envelope(medication_request(27)))
    assert outcome.category is Category.TRANSPORT
    assert "metadata" in outcome.detail


@pytest.mark.parametrize(
    ("overrides", "env_kw", "fragment"),
    [
        ({"enabled": False}, {}, "disabled"),
        ({"enabled_message_types": ("ServiceRequest",)}, {}, "not enabled"),
        ({}, {"content_type": "x-application/hl7-v2+er7"}, "content type"),
        ({}, {"delivery_system": ""}, "delivery identifier"),
    ],
    ids=["disabled", "type-not-enabled", "hl7-content", "no-delivery-system"],
)
def test_config_refusals(make_adapter, sim, tenant, overrides, env_kw, fragment) -> None:
    outcome = make_adapter(**overrides).deliver(envelope(medication_request(28), **env_kw))
    assert outcome.category is Category.CONFIG
    assert fragment in outcome.detail
    assert sim.requests(tenant)["all_requests"] == 0


def test_adapter_for_protocols() -> None:
    from app.adapters.ehr.hl7v2_mllp import Hl7MllpAdapter

    hl7 = ConnectionSettings(name="lab", protocol="hl7v2-mllp", endpoint="127.0.0.1:2575")
    assert isinstance(adapter_for(hl7), Hl7MllpAdapter)
    with pytest.raises(ConfigError, match="HOST:PORT") as info:
        adapter_for(ConnectionSettings(name="lab", protocol="hl7v2-mllp", endpoint="lab.example.org"))
    assert info.value.category is Category.CONFIG
    assert info.value.to_outcome().category is Category.CONFIG
    with pytest.raises(AdapterError):
        adapter_for(ConnectionSettings(name="x", protocol="carrier-pigeon", endpoint="coop"))


# --------------------------------------------------------------------------- SMART backend services


def smart_settings(sim: SimServer, tenant: str, secret_env: str) -> dict:
    return {
        "auth_token_url": sim.tenant_url(tenant) + "/auth/token",
        "auth_client_id": "recon",
        "auth_secret_env": secret_env,
    }


def test_smart_token_is_fetched_once_and_sent(make_adapter, sim, tenant, monkeypatch) -> None:
    monkeypatch.setenv("RECON_TEST_EHR_SECRET", "s3cret")
    sim.set_profile(tenant, "smart", client_id="recon", client_secret="s3cret")
    seen: list[httpx.Request] = []
    with httpx.Client(event_hooks={"request": [seen.append]}) as client:
        adapter = make_adapter(client=client, **smart_settings(sim, tenant, "RECON_TEST_EHR_SECRET"))
        assert adapter.deliver(envelope(medication_request(29))).delivered
        assert adapter.deliver(envelope(medication_request(30))).delivered
    token_requests = [r for r in seen if r.url.path.endswith("/auth/token")]
    assert len(token_requests) == 1
    assert token_requests[0].headers["Authorization"].startswith("Basic ")
    posts = [r for r in seen if r.method == "POST" and r.url.path.endswith("/MedicationRequest")]
    assert all(r.headers["Authorization"].startswith("Bearer ") for r in posts)
    assert "s3cret" not in repr(adapter.__dict__)  # the secret is never kept


def test_smart_wrong_secret_is_auth(make_adapter, sim, tenant, monkeypatch) -> None:
    monkeypatch.setenv("RECON_TEST_EHR_SECRET", "wrong")
    sim.set_profile(tenant, "smart", client_id="recon", client_secret="s3cret")
    outcome = make_adapter(**smart_settings(sim, tenant, "RECON_TEST_EHR_SECRET")).deliver(
        envelope(medication_request(31))
    )
    assert outcome.category is Category.AUTH
    assert outcome.status_code == 401
    assert outcome.provably_not_applied
    assert "invalid_client" in outcome.detail
    assert sim.requests(tenant)["total"] == 0


def test_smart_missing_secret_variable_is_config(make_adapter, sim, tenant, monkeypatch) -> None:
    monkeypatch.delenv("RECON_TEST_EHR_SECRET_UNSET", raising=False)
    outcome = make_adapter(**smart_settings(sim, tenant, "RECON_TEST_EHR_SECRET_UNSET")).deliver(
        envelope(medication_request(32))
    )
    assert outcome.category is Category.CONFIG
    assert "RECON_TEST_EHR_SECRET_UNSET" in outcome.detail
    assert sim.requests(tenant)["all_requests"] == 0


def test_smart_rejected_token_is_dropped_and_renewed(make_adapter, sim, tenant, monkeypatch) -> None:
    monkeypatch.setenv("RECON_TEST_EHR_SECRET", "s3cret")
    sim.set_profile(tenant, "smart")
    adapter = make_adapter(**smart_settings(sim, tenant, "RECON_TEST_EHR_SECRET"))
    assert adapter.deliver(envelope(medication_request(33))).delivered
    sim.reset(tenant)  # the EHR forgets every token it issued
    sim.set_profile(tenant, "smart")
    refused = adapter.deliver(envelope(medication_request(34)))
    assert refused.category is Category.AUTH and refused.status_code == 401
    assert adapter.deliver(envelope(medication_request(35))).delivered


# --------------------------------------------------------------------------- reconciliation, connection check


def test_find_applied_true_false(adapter: FhirR4Adapter) -> None:
    sent = envelope(medication_request(36))
    assert adapter.deliver(sent).delivered
    assert adapter.find_applied(sent) is True
    assert adapter.find_applied(envelope(medication_request(36))) is False


def test_find_applied_none_without_search_support(make_adapter) -> None:
    adapter = make_adapter(supports_identifier_search=False)
    env = envelope(medication_request(37))
    assert adapter.deliver(env).delivered
    assert adapter.find_applied(env) is None


def test_find_applied_none_on_error(make_adapter, closed_port: int, sim: SimServer, tenant) -> None:
    env = envelope(medication_request(38))
    assert make_adapter(endpoint=f"http://127.0.0.1:{closed_port}/fhir/x").find_applied(env) is None
    sim.set_profile(tenant, "expired-token")
    assert make_adapter().find_applied(env) is None


def test_find_applied_distrusts_a_server_that_ignores_the_search(make_adapter) -> None:
    """A Bundle of resources without our identifier means the parameter was ignored: cannot tell."""
    other = {**medication_request(39), "id": "1"}

    def handler(request: httpx.Request) -> httpx.Response:
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{"resource": other}]}
        return httpx.Response(200, json=bundle)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        adapter = make_adapter(endpoint="http://ehr.invalid/fhir", client=client)
        assert adapter.find_applied(envelope(medication_request(39))) is None


def test_check_connection(make_adapter, sim: SimServer, tenant: str, closed_port: int) -> None:
    ok = make_adapter().check_connection()
    assert ok["ok"] is True and ok["fhirVersion"] == "4.0.1"
    sim.set_profile(tenant, "r4b")
    mismatch = make_adapter().check_connection()
    assert mismatch["ok"] is False
    assert mismatch["detail"] == "EHR reports fhirVersion 4.3.0, connection pinned to 4.0.1"
    down = make_adapter(endpoint=f"http://127.0.0.1:{closed_port}/fhir/x").check_connection()
    assert down["ok"] is False and down["category"] == "transport"


# --------------------------------------------------------------------------- classify() edge cases (no network)


def _classify(status: int, body: bytes = b"", headers: dict | None = None, phase: str = CREATE):
    response = httpx.Response(status, content=body, headers=headers or {})
    return classify(
        phase=phase,
        summary="POST x MedicationRequest",
        started=time.monotonic(),
        response=response,
        resource_type=MR,
    )


def test_classify_location_only_success() -> None:
    outcome = _classify(201, b"", {"Location": "http://ehr/fhir/MedicationRequest/42/_history/1"})
    assert outcome.delivered and outcome.resource_ref == "MedicationRequest/42"


def test_classify_unexpected_success_shapes() -> None:
    assert _classify(202, b"").category is Category.MALFORMED_RESPONSE
    wrong_type = _classify(201, json.dumps({"resourceType": "Patient", "id": "1"}).encode())
    assert wrong_type.outcome is AttemptOutcome.UNKNOWN


def test_classify_conflict_and_redirect() -> None:
    conflict = _classify(
        409,
        json.dumps(
            {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "duplicate"}]}
        ).encode(),
    )
    assert conflict.category is Category.DUPLICATE_SUSPECTED and not conflict.provably_not_applied
    moved = _classify(301, b"", {"Location": "https://ehr/fhir"})
    assert moved.category is Category.CONFIG and moved.provably_not_applied


def test_classify_token_refusal_is_auth() -> None:
    outcome = _classify(400, b'{"error": "invalid_scope"}', phase=TOKEN)
    assert outcome.category is Category.AUTH
    assert outcome.provably_not_applied


def test_classify_excerpt_is_bounded() -> None:
    outcome = _classify(500, b"x" * 10_000)
    assert len(outcome.response_excerpt) == 2000


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_classify_survives_a_hostile_operation_outcome() -> None:
    body = json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "invalid", "expression": 5}]})
    outcome = _classify(422, body.encode())
    assert outcome.category is Category.EHR_REJECTED
    assert outcome.issues == [{"severity": "", "code": "invalid", "diagnostics": "", "expression": []}]
    assert outcome.status_code == 422
