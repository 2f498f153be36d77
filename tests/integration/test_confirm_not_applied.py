"""SPEC 2 and 3.1: on a connection that cannot search the EHR, an unknown outcome is never
resent until a clinical lead has confirmed it was not applied."""

from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body


def test_unknown_outcome_without_search_needs_confirm_not_applied(
    client, users, sim_connection, sim_control, run_worker, make_tokens
):
    tenant = sim_connection(
        "legacy-fhir", customer="Legacy Clinic", conditional_create=False, identifier_search=False
    )
    tokens = make_tokens("rita", "lena", "leo")
    # The connection is reset before the EHR processes anything: from our side, an unknown outcome.
    sim_control.set_profile(tenant, rate_reset=1.0)
    r = client.post(
        "/api/v1/messages",
        json=message_body("legacy-fhir", medication_request(31)),
        headers={"Authorization": f"Bearer {tokens['svc']}", "Idempotency-Key": "legacy-1"},
    )
    run_worker()
    m = client.get(
        f"/api/v1/messages/{r.json['id']}", headers={"Authorization": f"Bearer {tokens['svc']}"}
    ).json
    exc_id = m["exception_id"]

    def decide(who, **body):
        return client.post(
            f"/api/v1/exceptions/{exc_id}/decisions",
            json=body,
            headers={"Authorization": f"Bearer {tokens[who]}"},
        )

    e = client.get(f"/api/v1/exceptions/{exc_id}", headers={"Authorization": f"Bearer {tokens['rita']}"}).json
    assert e["category"] == "unknown_outcome" and e["needs_not_applied_confirmation"] is True

    r = decide("rita", action="resubmit", reason="looks transient")
    assert r.status_code == 409 and r.json["error"]["code"] == "needs_confirm_not_applied"
    r = decide("rita", action="confirm_not_applied", reason="I checked")
    assert r.status_code == 403  # clinical leads only
    r = decide(
        "lena", action="confirm_not_applied", reason="called Legacy Clinic: order 31 is not in their EHR"
    )
    assert r.status_code == 201 and r.json["state"] == "open"
    assert decide("rita", action="resubmit", reason="confirmed not applied").status_code == 201
    sim_control.set_profile(tenant, preset="default")
    assert decide("leo", action="approve", reason="ok", password=PASSWORD).status_code == 201
    run_worker()
    e = client.get(f"/api/v1/exceptions/{exc_id}", headers={"Authorization": f"Bearer {tokens['rita']}"}).json
    assert e["state"] == "resolved"
    assert sim_control.applied_count(tenant, "urn:recon:idempotency:svc", "legacy-1") == 1
