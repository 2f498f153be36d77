"""Issue 5: mojibake is detected at intake but never silently changed in clinical content — the
message waits as data_shape, the repaired text is a proposal that opens in the correction editor,
and it reaches the EHR only as a corrected replay a clinical lead approved."""

from __future__ import annotations

import html
import json

import sqlalchemy as sa

from app.db.models import ExceptionItem, Message, PayloadVersion, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body


def test_double_encoded_name_waits_as_data_shape_with_a_proposed_repair_applied_only_by_four_eyes(
    client, users, fhir_connection, sessions, sim_control, run_worker, login, post
):
    tenant = fhir_connection.tenant
    resource = medication_request(51)
    resource["note"] = [{"text": "Patient MÃ¼ller reports nausea"}]  # UTF-8 read as Windows-1252
    r = client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", resource),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "moji-1"},
    )
    assert r.status_code == 202 and r.json["category"] == "data_shape", r.json
    exc_id = r.json["exception_id"]
    with transaction(sessions, read_only=True) as s:
        message = s.get(Message, r.json["id"])
        versions = s.scalars(
            sa.select(PayloadVersion)
            .where(PayloadVersion.message_id == message.id)
            .order_by(PayloadVersion.version)
        ).all()
        assert [v.version for v in versions] == [1, 2] and message.current_payload_id == versions[0].id
        assert "M\\u00c3\\u00bcller" in versions[0].text  # the original is kept as received
        assert "Müller" in versions[1].text and versions[1].reason.startswith("proposed repair: mojibake")
        assert s.get(ExceptionItem, exc_id).detail.startswith("mojibake: text at note[0].text")
    run_worker()
    assert sim_control.deliveries(tenant) == {}  # nothing is sent while it waits

    login("rita")
    page = html.unescape(client.get(f"/exceptions/{exc_id}/correct").get_data(as_text=True))
    assert 'id="proposed-repair"' in page and "Patient Müller reports nausea" in page
    proposed = json.loads(versions[1].text)
    response = post(
        f"/exceptions/{exc_id}/correct",
        {
            "payload": json.dumps(proposed, indent=2),
            "reason": "accept the proposed mojibake repair",
            "submit": "1",
            "expected_version": "1",
        },
    )
    assert response.status_code == 303
    with transaction(sessions) as s:
        decide(
            s, exc_id, s.get(User, users["lena"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    run_worker()
    with transaction(sessions, read_only=True) as s:
        assert s.get(ExceptionItem, exc_id).state == "resolved"
    applied = sim_control.applied(tenant)
    assert applied["by_identifier"]["urn:recon:idempotency:svc|moji-1"] == 1
