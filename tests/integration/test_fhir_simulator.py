"""The simulated EHR over real HTTP: FHIR subset, fault profiles, inspection API."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from app.simulator import PRESETS, Fault, FaultProfile, ProfileError, SimServer
from app.simulator.profiles import latency_for, resolve, unit_draw
from tests.samples_fhir import DELIVERY_SYSTEM, ICD9, medication_request, observation, patient, without

FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
# Plain HTTP to the local simulator: skip loading the CA bundle (~30 ms per client).
PLAIN = {"verify": False}


@pytest.fixture
def fhir(sim: SimServer, tenant: str) -> Iterator[httpx.Client]:
    """An HTTP client whose base is the fresh tenant's FHIR base URL."""
    with httpx.Client(base_url=sim.tenant_url(tenant) + "/", timeout=5.0, **PLAIN) as client:
        yield client


@pytest.fixture(scope="module")
def ctl(sim: SimServer) -> Iterator[httpx.Client]:
    """An HTTP client for the /_sim control API."""
    with httpx.Client(base_url=sim.base_url + "/_sim/", timeout=5.0, **PLAIN) as client:
        yield client


def keyed(n: int, key: str | None = None) -> dict:
    """A MedicationRequest carrying a delivery identifier."""
    resource = medication_request(n)
    resource["identifier"].append({"system": DELIVERY_SYSTEM, "value": key or f"key-{n}"})
    return resource


def post(client: httpx.Client, resource: dict, **headers: str) -> httpx.Response:
    return client.post(resource["resourceType"], content=json.dumps(resource), headers={**FHIR, **headers})


def set_profile(ctl: httpx.Client, tenant: str, **doc) -> dict:
    response = ctl.put(f"tenants/{tenant}/profile", json=doc)
    assert response.status_code == 200, response.text
    return response.json()


def applied(ctl: httpx.Client, tenant: str, identifier: str | None = None) -> dict:
    params = {"identifier": identifier} if identifier else None
    return ctl.get(f"tenants/{tenant}/applied", params=params).json()


# --------------------------------------------------------------------------- basics


def test_health_and_urls(sim: SimServer, ctl: httpx.Client) -> None:
    assert sim.fhir_port > 0
    assert sim.base_url == f"http://127.0.0.1:{sim.fhir_port}"
    assert sim.tenant_url("acme-epic") == f"{sim.base_url}/fhir/acme-epic"
    response = ctl.get("health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_metadata_reports_profile_fhir_version(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    doc = fhir.get("metadata").json()
    assert doc["resourceType"] == "CapabilityStatement"
    assert doc["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in doc["rest"][0]["resource"]}
    assert {
        "Patient",
        "Encounter",
        "Observation",
        "MedicationRequest",
        "ServiceRequest",
        "DiagnosticReport",
    } <= types
    set_profile(ctl, tenant, fhir_version="4.3.0")
    assert fhir.get("metadata").json()["fhirVersion"] == "4.3.0"


def test_create_read_and_search(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    response = post(fhir, keyed(1))
    assert response.status_code == 201
    body = response.json()
    assert body["resourceType"] == "MedicationRequest"
    assert body["meta"]["versionId"] == "1"
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"].endswith(f"/fhir/{tenant}/MedicationRequest/{body['id']}/_history/1")

    read = fhir.get(f"MedicationRequest/{body['id']}")
    assert read.status_code == 200
    assert read.json()["identifier"] == body["identifier"]

    found = fhir.get("MedicationRequest", params={"identifier": f"{DELIVERY_SYSTEM}|key-1"}).json()
    assert found["resourceType"] == "Bundle" and found["type"] == "searchset"
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["id"] == body["id"]
    assert (
        fhir.get("MedicationRequest", params={"identifier": f"{DELIVERY_SYSTEM}|nope"}).json()["total"] == 0
    )
    # Value-only token matches any system; another type does not see it.
    assert fhir.get("MedicationRequest", params={"identifier": "key-1"}).json()["total"] == 1
    assert fhir.get("ServiceRequest", params={"identifier": f"{DELIVERY_SYSTEM}|key-1"}).json()["total"] == 0

    assert applied(ctl, tenant) == {
        "by_identifier": {
            f"{DELIVERY_SYSTEM}|key-1": 1,
            "urn:oid:2.16.840.1.113883.3.7418.1.1|ORD-100002": 1,
        },
        "total": 1,
    }
    one = applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-1")
    assert one["count"] == 1 and one["ids"] == [body["id"]]


def test_other_resource_types(fhir: httpx.Client) -> None:
    assert post(fhir, patient(1)).status_code == 201
    assert post(fhir, observation(1)).status_code == 201
    response = post(fhir, {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}})
    assert response.status_code == 201


def test_read_missing_is_not_found(fhir: httpx.Client) -> None:
    response = fhir.get("MedicationRequest/999")
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"this is not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"status": "active"}', "no resourceType"),
        (b'{"resourceType": "Spaceship"}', "unknown type"),
    ],
)
def test_bad_bodies_are_structure_errors(fhir: httpx.Client, ctl: httpx.Client, tenant, body, why) -> None:
    response = fhir.post("MedicationRequest", content=body, headers=FHIR)
    assert response.status_code == 400, why
    doc = response.json()
    assert doc["resourceType"] == "OperationOutcome"
    assert doc["issue"][0]["code"] == "structure"
    assert applied(ctl, tenant)["total"] == 0


def test_body_type_must_match_url(fhir: httpx.Client) -> None:
    response = fhir.post("ServiceRequest", content=json.dumps(keyed(1)), headers=FHIR)
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "invalid"


def test_unknown_url_type_is_not_found(fhir: httpx.Client) -> None:
    response = fhir.post("Spaceship", content=b"{}", headers=FHIR)
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


# --------------------------------------------------------------------------- conditional create, update


def test_conditional_create_returns_existing(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    condition = f"identifier={DELIVERY_SYSTEM}|key-7"
    first = post(fhir, keyed(7), **{"If-None-Exist": condition})
    second = post(fhir, keyed(7), **{"If-None-Exist": condition})
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-7")["count"] == 1
    assert ctl.get(f"tenants/{tenant}/requests").json()["by_identifier"][f"{DELIVERY_SYSTEM}|key-7"] == 2


def test_conditional_create_with_several_matches_is_412(
    fhir: httpx.Client, ctl: httpx.Client, tenant
) -> None:
    set_profile(ctl, tenant, preset="legacy-ignores-conditional")
    condition = f"identifier={DELIVERY_SYSTEM}|key-8"
    assert post(fhir, keyed(8), **{"If-None-Exist": condition}).status_code == 201
    assert post(fhir, keyed(8), **{"If-None-Exist": condition}).status_code == 201  # duplicate!
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-8")["count"] == 2

    set_profile(ctl, tenant, preset="default")
    response = post(fhir, keyed(8), **{"If-None-Exist": condition})
    assert response.status_code == 412
    assert response.json()["issue"][0]["code"] == "multiple-matches"
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-8")["count"] == 2


def test_concurrent_conditional_creates_apply_once(sim: SimServer, tenant: str) -> None:
    """The check and the insert are atomic, as the second line of defence should be."""
    url = sim.tenant_url(tenant) + "/MedicationRequest"
    body = json.dumps(keyed(9))
    headers = {**FHIR, "If-None-Exist": f"identifier={DELIVERY_SYSTEM}|key-9"}
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=5, **PLAIN) as client:
            statuses.append(client.post(url, content=body, headers=headers).status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 7 + [201]
    assert sim.applied(tenant, f"{DELIVERY_SYSTEM}|key-9")["count"] == 1


def test_update_honours_if_match(fhir: httpx.Client) -> None:
    created = post(fhir, keyed(3)).json()
    rid = created["id"]
    changed = {**created, "status": "on-hold"}
    ok = fhir.put(
        f"MedicationRequest/{rid}", content=json.dumps(changed), headers={**FHIR, "If-Match": 'W/"1"'}
    )
    assert ok.status_code == 200
    assert ok.json()["meta"]["versionId"] == "2"
    assert ok.headers["ETag"] == 'W/"2"'
    stale = fhir.put(
        f"MedicationRequest/{rid}", content=json.dumps(changed), headers={**FHIR, "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert fhir.get(f"MedicationRequest/{rid}").json()["status"] == "on-hold"


def test_update_as_create_and_id_mismatch(fhir: httpx.Client) -> None:
    resource = {**keyed(4), "id": "abc-1"}
    assert fhir.put("MedicationRequest/abc-1", content=json.dumps(resource), headers=FHIR).status_code == 201
    wrong = fhir.put("MedicationRequest/other", content=json.dumps(resource), headers=FHIR)
    assert wrong.status_code == 400


# --------------------------------------------------------------------------- quirks and faults


def test_create_returns_200_quirk(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, preset="cerner-like", latency_ms=0)
    response = post(fhir, keyed(1))
    assert response.status_code == 200
    assert response.json()["id"]


def test_require_fields_quirk(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, require_fields={"MedicationRequest": ["dosageInstruction"]})
    response = post(fhir, without(keyed(1), "dosageInstruction"))
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["code"] == "required"
    assert issue["expression"] == ["MedicationRequest.dosageInstruction"]
    assert "dosageInstruction" in issue["diagnostics"]
    assert applied(ctl, tenant)["total"] == 0
    assert post(fhir, keyed(2)).status_code == 201


def test_reject_code_systems_anywhere_in_resource(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, preset="icd9-strict")
    resource = keyed(1)
    resource["reasonCode"] = [{"coding": [{"system": ICD9, "code": "401.9"}]}]
    response = post(fhir, resource)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == ["MedicationRequest.reasonCode[0].coding[0].system"]
    assert applied(ctl, tenant)["total"] == 0


@pytest.mark.parametrize(
    ("field", "status", "code"),
    [("rate_503", 503, "transient"), ("rate_429", 429, "throttled"), ("rate_500", 500, "exception")],
)
def test_error_rates(fhir: httpx.Client, ctl: httpx.Client, tenant, field, status, code) -> None:
    set_profile(ctl, tenant, **{field: 1.0, "retry_after_seconds": 7})
    response = post(fhir, keyed(1))
    assert response.status_code == status
    assert response.json()["issue"][0]["code"] == code
    if status in (503, 429):
        assert response.headers["Retry-After"] == "7"
    assert applied(ctl, tenant)["total"] == 0
    assert ctl.get(f"tenants/{tenant}/requests").json()["total"] == 1


def test_reject_rate(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, rate_reject=1.0)
    response = post(fhir, keyed(1))
    assert response.status_code == 422
    assert response.json()["issue"][0]["code"] == "invalid"


def test_reset_stores_nothing_but_counts_the_request(fhir: httpx.Client, ctl: httpx.Client, tenant) -> None:
    set_profile(ctl, tenant, rate_reset=1.0)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        post(fhir, keyed(1))
    assert applied(ctl, tenant)["total"] == 0
    assert ctl.get(f"tenants/{tenant}/requests").json()["by_identifier"] == {
        f"{DELIVERY_SYSTEM}|key-1": 1,
        "urn:oid:2.16.840.1.113883.3.7418.1.1|ORD-100002": 1,
    }


def test_commit_then_drop_stores_without_answering(fhir: httpx.Client, ctl: httpx.Client, tenant) -> None:
    set_profile(ctl, tenant, rate_commit_then_drop=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(fhir, keyed(1))
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-1")["count"] == 1
    # The server keeps serving other requests afterwards.
    assert fhir.get("metadata").status_code == 200


def test_slow_commit_then_drop_applies_only_after_the_delay(
    fhir: httpx.Client, ctl: httpx.Client, tenant
) -> None:
    set_profile(ctl, tenant, rate_slow_commit_then_drop=1.0, slow_commit_seconds=2)
    started = time.monotonic()
    with pytest.raises((httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError)):
        resource = keyed(1)  # the client gives up first, as a worker's read timeout would:
        fhir.post(resource["resourceType"], content=json.dumps(resource), headers=FHIR, timeout=0.5)
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-1")["count"] == 0  # not yet
    while time.monotonic() - started < 2.5:
        time.sleep(0.1)
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-1")["count"] == 1  # applied late, unseen


def test_malformed_body_after_commit(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, preset="malformed")
    response = post(fhir, keyed(1))
    assert response.status_code == 201
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert applied(ctl, tenant)["total"] == 1


def test_expired_token(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, preset="expired-token")
    response = post(fhir, keyed(1))
    assert response.status_code == 401
    assert response.json()["issue"][0]["code"] == "expired"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert fhir.get("MedicationRequest").status_code == 401
    assert fhir.get("metadata").status_code == 200  # the CapabilityStatement stays public
    assert applied(ctl, tenant)["total"] == 0


def test_bearer_token_flow(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, preset="smart", client_id="recon", client_secret="s3cret", token_ttl_seconds=60)
    assert post(fhir, keyed(1)).status_code == 401
    assert post(fhir, keyed(1), Authorization="Bearer forged").json()["issue"][0]["code"] == "security"

    refused = fhir.post("auth/token", data={"grant_type": "client_credentials"}, auth=("recon", "wrong"))
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    granted = fhir.post("auth/token", data={"grant_type": "client_credentials"}, auth=("recon", "s3cret"))
    assert granted.status_code == 200
    token = granted.json()
    assert token["token_type"] == "bearer" and token["expires_in"] == 60

    response = post(fhir, keyed(1), Authorization=f"Bearer {token['access_token']}")
    assert response.status_code == 201
    assert applied(ctl, tenant)["total"] == 1


def test_latency_applies_but_not_to_metadata(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, latency_ms=400)
    started = time.monotonic()
    fhir.get("metadata")
    assert time.monotonic() - started < 0.35
    started = time.monotonic()
    post(fhir, keyed(1))
    assert time.monotonic() - started >= 0.4


def test_slow_requests_do_not_block_others(sim: SimServer, ctl: httpx.Client, tenant: str) -> None:
    slow_tenant = tenant + "-slow"
    set_profile(ctl, slow_tenant, latency_ms=500)
    slow_done = threading.Event()

    def slow() -> None:
        with httpx.Client(timeout=5, **PLAIN) as client:
            client.get(sim.tenant_url(slow_tenant) + "/MedicationRequest")
        slow_done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    with httpx.Client(timeout=5, **PLAIN) as client:
        assert client.get(sim.tenant_url(tenant) + "/MedicationRequest").status_code == 200
    assert time.monotonic() - started < 0.3
    assert not slow_done.is_set()
    thread.join()


def test_request_is_applied_even_if_the_client_gives_up(
    sim: SimServer, ctl: httpx.Client, tenant: str
) -> None:
    """A killed worker's request still lands: the reason reconciliation exists."""
    set_profile(ctl, tenant, latency_ms=300)
    timeout = httpx.Timeout(5.0, read=0.05)
    with (
        httpx.Client(base_url=sim.tenant_url(tenant) + "/", timeout=timeout, **PLAIN) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        post(client, keyed(1))
    assert applied(ctl, tenant)["total"] == 0  # still sleeping
    deadline = time.monotonic() + 3
    while applied(ctl, tenant)["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert applied(ctl, tenant, f"{DELIVERY_SYSTEM}|key-1")["count"] == 1


def test_raw_socket_client_killed_mid_request(sim: SimServer, ctl: httpx.Client, tenant: str) -> None:
    set_profile(ctl, tenant, latency_ms=200)
    body = json.dumps(keyed(2)).encode()
    request = (
        f"POST /fhir/{tenant}/MedicationRequest HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", sim.fhir_port)) as sock:
        sock.sendall(request)
    # The socket is closed before any answer; the server must still apply the order.
    deadline = time.monotonic() + 3
    while applied(ctl, tenant)["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert applied(ctl, tenant)["total"] == 1


# --------------------------------------------------------------------------- profiles, control API


def test_profile_put_get_and_errors(ctl: httpx.Client, tenant: str) -> None:
    effective = set_profile(ctl, tenant, preset="flaky", rate_503=0.5, seed="abc")
    assert effective["name"] == "flaky"
    assert effective["rate_503"] == 0.5
    assert effective["rate_429"] == PRESETS["flaky"].rate_429
    assert effective["seed"] == "abc"
    assert ctl.get(f"tenants/{tenant}/profile").json() == effective

    assert ctl.put(f"tenants/{tenant}/profile", json={"preset": "nope"}).status_code == 400
    assert ctl.put(f"tenants/{tenant}/profile", json={"rate_nonsense": 1}).status_code == 400
    assert ctl.put(f"tenants/{tenant}/profile", json={"rate_503": 2}).status_code == 400
    assert ctl.put(f"tenants/{tenant}/profile", json={"latency_ms": "slow"}).status_code == 400
    assert ctl.put(f"tenants/{tenant}/profile", content=b"[]").status_code == 400
    # Overrides without a preset start from the default preset (PUT replaces).
    assert set_profile(ctl, tenant, latency_ms=5) == {**PRESETS["default"].to_dict(), "latency_ms": 5}


def test_tenants_are_isolated_and_reset(
    fhir: httpx.Client, ctl: httpx.Client, sim: SimServer, tenant
) -> None:
    other = tenant + "-other"
    set_profile(ctl, tenant, preset="cerner-like")
    post(fhir, keyed(1))
    assert applied(ctl, other)["total"] == 0
    assert ctl.get(f"tenants/{other}/profile").json()["name"] == "default"

    assert ctl.post(f"tenants/{tenant}/reset").status_code == 200
    assert applied(ctl, tenant)["total"] == 0
    assert ctl.get(f"tenants/{tenant}/requests").json()["total"] == 0
    assert ctl.get(f"tenants/{tenant}/profile").json()["name"] == "default"


def test_reset_all() -> None:
    # A private server: resetting the shared one would disturb other tests.
    with (
        SimServer().start() as private,
        httpx.Client(base_url=private.base_url, timeout=5, **PLAIN) as client,
    ):
        client.post("/fhir/a/MedicationRequest", content=json.dumps(keyed(1)), headers=FHIR)
        client.post("/fhir/b/MedicationRequest", content=json.dumps(keyed(2)), headers=FHIR)
        assert client.post("/_sim/reset").status_code == 200
        assert client.get("/_sim/tenants/a/applied").json()["total"] == 0
        assert client.get("/_sim/tenants").json()["tenants"] == []


def test_unknown_control_endpoint(ctl: httpx.Client) -> None:
    assert ctl.get("nope").status_code == 404


def test_in_process_helpers_match_http_api(
    sim: SimServer, fhir: httpx.Client, ctl: httpx.Client, tenant
) -> None:
    profile = sim.set_profile(tenant, "cerner-like", latency_ms=0)
    assert profile.create_returns_200 and profile.latency_ms == 0
    post(fhir, keyed(1))
    assert sim.applied(tenant) == applied(ctl, tenant)
    assert sim.requests(tenant) == ctl.get(f"tenants/{tenant}/requests").json()
    sim.reset(tenant)
    assert sim.applied(tenant)["total"] == 0


def test_stop_is_prompt_with_open_keepalive_and_sleeping_requests() -> None:
    server = SimServer().start()
    server.set_profile("t", latency_ms=5000)
    client = httpx.Client(base_url=server.tenant_url("t") + "/", timeout=10, **PLAIN)
    client.get("metadata")  # leaves a keep-alive connection open
    results: list[object] = []

    def sleeping_request() -> None:
        try:
            results.append(client.get("MedicationRequest").status_code)
        except httpx.HTTPError as exc:
            results.append(exc)

    worker = threading.Thread(target=sleeping_request)
    worker.start()
    time.sleep(0.1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    worker.join(timeout=5)
    client.close()
    assert len(results) == 1  # answered or cut off, but not left hanging


# --------------------------------------------------------------------------- determinism


def test_rates_are_deterministic(sim: SimServer, ctl: httpx.Client, tenant: str) -> None:
    """Same tenant, seed and identifiers -> the same sequence of answers, including retries."""

    def run() -> list[int]:
        set_profile(ctl, tenant, rate_503=0.4, rate_429=0.2, seed="drill-1")
        statuses = []
        with httpx.Client(base_url=sim.tenant_url(tenant) + "/", timeout=5, **PLAIN) as client:
            for n in range(20):
                for _attempt in range(2):  # a retry of the same identifier gets its own draw
                    statuses.append(post(client, keyed(n)).status_code)
        ctl.post(f"tenants/{tenant}/reset")
        return statuses

    first, second = run(), run()
    assert first == second
    assert {201, 503, 429} <= set(first)


def test_unit_draw_properties() -> None:
    draws = [unit_draw("t", "k", n, "s") for n in range(500)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert draws == [unit_draw("t", "k", n, "s") for n in range(500)]
    assert draws != [unit_draw("t", "k", n, "other-seed") for n in range(500)]
    assert unit_draw("t1", "k", 0, "s") != unit_draw("t2", "k", 0, "s")
    assert 0.4 < sum(draws) / len(draws) < 0.6


def test_fault_for_partitions_the_unit_interval() -> None:
    profile = FaultProfile(rate_reset=0.1, rate_503=0.2)
    assert profile.fault_for(0.05) is Fault.RESET
    assert profile.fault_for(0.15) is Fault.UNAVAILABLE_503
    assert profile.fault_for(0.35) is None
    assert FaultProfile().fault_for(0.0) is None
    assert FaultProfile(rate_500=1.0).fault_for(0.999) is Fault.ERROR_500


def test_latency_jitter_is_deterministic_and_bounded() -> None:
    profile = FaultProfile(latency_ms=10, latency_jitter_ms=20, seed="x")
    values = [latency_for(profile, "t", "k", n) for n in range(100)]
    assert values == [latency_for(profile, "t", "k", n) for n in range(100)]
    assert all(0.010 <= v <= 0.030 for v in values)


def test_profiles_round_trip_and_validate() -> None:
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert FaultProfile.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    with pytest.raises(ProfileError):
        FaultProfile(rate_500=0.6, rate_503=0.6)
    with pytest.raises(ProfileError):
        resolve({"preset": "missing"})
    with pytest.raises(ProfileError):
        FaultProfile.from_dict({"require_fields": {"MedicationRequest": "dosageInstruction"}})
    assert resolve({"preset": "chaos", "seed": 7}).seed == "7"


def test_run_sim_serves_until_sigterm() -> None:
    """What `recon sim` runs: announces its URL, serves, exits cleanly on SIGTERM."""
    code = "from app.simulator import run_sim; run_sim('127.0.0.1', 0, 'cerner-like')"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/fhir/<tenant>", line)
        assert match, line
        with httpx.Client(base_url=match.group(1), timeout=5, **PLAIN) as client:
            assert client.get("/_sim/health").json()["status"] == "ok"
            assert client.get("/_sim/tenants/x/profile").json()["name"] == "cerner-like"
            created = client.post("/fhir/x/MedicationRequest", content=json.dumps(keyed(1)), headers=FHIR)
            assert created.status_code == 200  # the default profile given on the command line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_chunked_request_body(fhir: httpx.Client, ctl: httpx.Client, tenant: str) -> None:
    body = json.dumps(keyed(1)).encode()
    chunks = iter([body[:100], body[100:]])  # an iterator makes httpx use Transfer-Encoding: chunked
    response = fhir.post("MedicationRequest", content=chunks, headers=FHIR)
    assert response.status_code == 201
    assert applied(ctl, tenant)["total"] == 1
