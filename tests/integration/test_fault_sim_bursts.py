"""Issue 6 'make drill': the simulated EHR can answer a burst of one fault — connection resets, 503
or 429 with Retry-After, commit-then-drop — on its FHIR server and its MLLP listener, for a
stated time, and counts every fault it served."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest

from app.domain.hl7 import frame, unframe
from tests.samples_fhir import DELIVERY_SYSTEM, medication_request

FHIR = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def tenant() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ctl(sim):
    with httpx.Client(base_url=sim.base_url + "/_sim/", timeout=5.0) as client:
        yield client


def create(sim, tenant: str, n: int) -> httpx.Response:
    resource = medication_request(n)
    resource["identifier"].append({"system": DELIVERY_SYSTEM, "value": f"burst-{n}"})
    with httpx.Client(timeout=5.0) as client:
        return client.post(
            f"{sim.tenant_url(tenant)}/MedicationRequest", content=json.dumps(resource), headers=FHIR
        )


def test_a_429_burst_answers_every_create_with_its_retry_after_until_it_is_ended(sim, ctl, tenant):
    started = ctl.post(
        f"tenants/{tenant}/burst", json={"fault": "throttled_429", "seconds": 30, "retry_after": 7}
    )
    assert started.status_code == 200 and started.json()["fault"] == "throttled_429"
    answers = [create(sim, tenant, n) for n in range(3)]
    assert [(r.status_code, r.headers["Retry-After"]) for r in answers] == [(429, "7")] * 3
    assert sim.applied(tenant)["total"] == 0  # refused before processing
    ctl.post(f"tenants/{tenant}/burst", json={"fault": None}).raise_for_status()
    assert create(sim, tenant, 3).status_code == 201
    assert ctl.get(f"tenants/{tenant}/burst").json() == {
        "fault": None,
        "remaining_seconds": 0.0,
        "faults": {"throttled_429": 3},
        "burst_faults": {"throttled_429": 3},
    }


def test_a_burst_ends_by_itself_after_its_seconds(sim, ctl, tenant):
    sim.burst(tenant, "unavailable_503", 0.2)
    time.sleep(0.3)
    assert ctl.get(f"tenants/{tenant}/burst").json()["fault"] is None
    assert create(sim, tenant, 0).status_code == 201


def test_a_503_burst_sends_the_profiles_retry_after_unless_it_names_its_own(sim, ctl, tenant):
    ctl.put(f"tenants/{tenant}/profile", json={"retry_after_seconds": 4}).raise_for_status()
    sim.burst(tenant, "unavailable_503", 5)
    answer = create(sim, tenant, 0)
    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "4")
    sim.burst(tenant, None, 0)  # ended early
    assert create(sim, tenant, 1).status_code == 201


def test_a_reset_burst_resets_fhir_creates_and_stores_nothing(sim, tenant):
    sim.burst(tenant, "reset", 5)
    with pytest.raises(httpx.TransportError):
        create(sim, tenant, 0)
    assert sim.applied(tenant)["total"] == 0
    assert sim.state.peek(tenant).burst()["faults"] == {"reset": 1}


def test_a_commit_then_drop_burst_stores_then_gives_no_answer(sim, tenant):
    sim.burst(tenant, "commit_then_drop", 5)
    with pytest.raises(httpx.TransportError):
        create(sim, tenant, 0)
    assert sim.applied(tenant)["total"] == 1


def test_a_burst_document_naming_an_unknown_fault_is_refused(ctl, tenant):
    r = ctl.post(f"tenants/{tenant}/burst", json={"fault": "meltdown", "seconds": 1})
    assert r.status_code == 400 and "meltdown" in r.json()["error"]


def _send_hl7(port: int, tenant: str, control_id: str) -> bytes | None:
    message = f"MSH|^~\\&|RECON|MERCY|EHR|{tenant.upper()}|20261202101500||ADT^A08|{control_id}|P|2.5.1\r"
    message += "PID|1||MRN-1^^^MERCY^MR||DOE^JANE||19800101|F\r"
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(frame(message.encode()))
        buffer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buffer += chunk
                ack, buffer = unframe(buffer)
                if ack is not None:
                    return ack
        except OSError:  # reset
            return None


@pytest.mark.parametrize(
    ("fault", "applied"), [("unavailable_503", {}), ("reset", {}), ("commit_then_drop", {"C1": 1})]
)
def test_an_mllp_burst_closes_the_connection_without_an_ack(sim, tenant, fault, applied):
    sim.burst(tenant, fault, 5)
    assert _send_hl7(sim.mllp_port, tenant, "C1") is None
    state = sim.state.peek(tenant)
    assert dict(state.hl7_applied) == applied
    assert state.burst()["burst_faults"] == {fault: 1}
    sim.burst(tenant, None, 0)
    assert b"MSA|AA|C2" in _send_hl7(sim.mllp_port, tenant, "C2")
