"""Issue 5 'Drift, made visible': per connection, counters over time by kind; the first occurrence
of a kind on a connection is flagged on the dashboard with an example exception until someone
acknowledges it; /metrics and the API carry the same."""

from __future__ import annotations

import base64

import sqlalchemy as sa

from app.db.models import AuditEvent, DriftCount, DriftKind
from app.db.session import transaction
from app.services import delivery

HL7 = "x-application/hl7-v2+er7"
# cp1252 bytes, no MSH-18: decoded by the Windows-1252 fallback (a decode_fallback observation).
LEGACY = (
    b"MSH|^~\\&|LAB|MERCY|EHR|MERCY|20261202101500||ORU^R01|C1|P|2.5.1\r"
    b"PID|1||MRN-7^^^MERCY^MR||M\xfcller^J\xf6rg||19800101|M\r"
    b"OBR|1|ORD1||24323-8^Metabolic panel^LN\r"
    b"OBX|1|NM|2345-7^Glucose^LN||95|mg/dL\r"
)


def report(client, token: str, key: str, raw: bytes):
    r = client.post(
        "/api/v1/exceptions",
        json={
            "connection": "mercy-epic",
            "message_type": "ORU^R01",
            "content_type": HL7,
            "payload_base64": base64.b64encode(raw).decode(),
            "error": "MSA|AE|C1\rERR||OBX^1^5|207^Application internal error^HL70357|E",
        },
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json


def reader(sessions, users) -> dict:
    """Bearer headers of a reviewer: the API takes tokens, not console sessions."""
    from app.services.users import create_token

    with transaction(sessions) as s:
        return {"Authorization": f"Bearer {create_token(s, s.merge(users['rita']))}"}


def drift_rows(sessions, kind: str):
    with transaction(sessions, read_only=True) as s:
        counts = s.scalars(sa.select(DriftCount).where(DriftCount.kind == kind)).all()
        kinds = s.scalars(sa.select(DriftKind).where(DriftKind.kind == kind)).all()
        return [(c.hour, c.count) for c in counts], [
            (k.id, k.example_message_id, k.acknowledged_by) for k in kinds
        ]


def test_a_new_kind_is_counted_flagged_with_an_example_and_acknowledged(
    client, users, fhir_connection, sessions, login, post
):
    first = report(client, users["svc_token"], "legacy-1", LEGACY)
    report(client, users["svc_token"], "legacy-2", LEGACY.replace(b"C1", b"C2"))
    report(client, users["svc_token"], "legacy-2", LEGACY.replace(b"C1", b"C2"))  # a repeat counts nothing

    counts, kinds = drift_rows(sessions, "decode_fallback")
    assert [n for _, n in counts] == [2]  # one hour bucket, two messages
    assert len(kinds) == 1 and kinds[0][1] == first["id"] and kinds[0][2] is None
    flag_id = kinds[0][0]

    api = client.get("/api/v1/drift", headers={"Authorization": f"Bearer {users['svc_token']}"})
    assert api.status_code == 403  # a service account submits; it does not read queues

    login("rita")
    page = client.get("/").get_data(as_text=True)
    assert (
        "Data drift" in page and "not UTF-8, decoded by a fallback" in page and "Drift per connection" in page
    )
    assert f'href="/exceptions/{first["exception_id"]}"' in page
    rita = reader(sessions, users)
    body = client.get("/api/v1/drift", headers=rita).get_json()
    assert [(f["connection"], f["kind"], f["count_24h"]) for f in body["flags"]] == [
        ("mercy-epic", "decode_fallback", 2)
    ]
    assert body["flags"][0]["example_exception_id"] == first["exception_id"]
    assert "Windows-1252" in body["flags"][0]["detail"]
    assert {"connection": "mercy-epic", "kind": "decode_fallback", "last_24h": 2, "last_7d": 2} in body[
        "counts"
    ]

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'recon_drift_observations_total{connection="mercy-epic",kind="decode_fallback"} 2' in metrics
    assert 'recon_drift_unacknowledged{connection="mercy-epic",kind="decode_fallback"} 1' in metrics

    r = post(f"/drift/{flag_id}/acknowledge")
    assert r.status_code == 303
    assert drift_rows(sessions, "decode_fallback")[1][0][2] == "rita"
    assert client.get("/api/v1/drift", headers=rita).get_json()["flags"] == []
    with transaction(sessions, read_only=True) as s:
        events = s.scalars(sa.select(AuditEvent).where(AuditEvent.action == "drift.acknowledge")).all()
        assert [(e.actor, e.details["kind"]) for e in events] == [("rita", "decode_fallback")]
    assert "recon_drift_unacknowledged{" not in client.get("/metrics").get_data(as_text=True)

    # Acknowledged: a third message counts, but flags nothing new.
    report(client, users["svc_token"], "legacy-3", LEGACY.replace(b"C1", b"C3"))
    counts, kinds = drift_rows(sessions, "decode_fallback")
    assert [n for _, n in counts] == [3] and len(kinds) == 1


def test_an_auditor_sees_drift_but_cannot_acknowledge_it(
    client, users, fhir_connection, sessions, login, post
):
    report(client, users["svc_token"], "legacy-a", LEGACY)
    flag_id = drift_rows(sessions, "decode_fallback")[1][0][0]
    login("audrey")
    page = client.get("/").get_data(as_text=True)
    assert "Data drift" in page and "Acknowledge</button>" not in page
    assert post(f"/drift/{flag_id}/acknowledge").status_code == 403
    assert drift_rows(sessions, "decode_fallback")[1][0][2] is None


def test_a_changed_capability_statement_is_drift(
    client, users, fhir_connection, sessions, sim_control, run_worker
):
    from tests.samples import medication_request, message_body

    headers = {"Authorization": f"Bearer {users['svc_token']}"}

    def submit(key: str, n: int) -> str:
        r = client.post(
            "/api/v1/messages",
            json=message_body("mercy-epic", medication_request(n)),
            headers={**headers, "Idempotency-Key": key},
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        return r.json["id"]

    submit("cap-1", 1)
    run_worker()
    assert drift_rows(sessions, "capability_change") == ([], [])  # the first statement seen is a baseline

    # The EHR is upgraded to FHIR 4.3.0; a restarted worker reads the new statement.
    sim_control.set_profile(fhir_connection.tenant, fhir_version="4.3.0")
    delivery.close_adapters()
    second = submit("cap-2", 2)
    run_worker()
    counts, kinds = drift_rows(sessions, "capability_change")
    assert [n for _, n in counts] == [1] and kinds[0][1] == second
    flags = client.get("/api/v1/drift", headers=reader(sessions, users)).get_json()["flags"]
    change = next(f for f in flags if f["kind"] == "capability_change")
    assert change["detail"].startswith("fhirVersion 4.0.1 → 4.3.0")
    assert change["example_exception_id"] is not None  # the mismatch itself became a config exception


def test_the_drift_page_lists_every_flag_and_the_dashboard_only_the_first_five(
    client, users, fhir_connection, sessions, login, post
):
    from app.db.models import Connection
    from app.services import drift
    from app.services.clock import utcnow

    with transaction(sessions) as s:
        conn_id = s.scalar(sa.select(Connection.id).where(Connection.name == "mercy-epic"))
        from app.domain.payloads import DRIFT_KINDS, Observation

        drift.record(s, conn_id, None, [Observation(kind, "ZPD", "seen") for kind in DRIFT_KINDS], utcnow())
    login("rita")
    page = client.get("/").get_data(as_text=True)
    assert page.count('class="drift-flag"') == 5
    assert f"All {len(drift.KIND_LABELS)} new kinds" in page
    full = client.get("/drift").get_data(as_text=True)
    assert full.count('class="drift-flag"') == len(drift.KIND_LABELS)
    flag_id = drift_rows(sessions, "z_segment")[1][0][0]
    r = post(f"/drift/{flag_id}/acknowledge", {"next": "drift"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/drift")
    assert (
        client.get("/drift").get_data(as_text=True).count('class="drift-flag"') == len(drift.KIND_LABELS) - 1
    )
