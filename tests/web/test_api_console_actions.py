"""Issue 8: an API for every console action — bulk decisions, replays (approve with the
password re-entered, reject with a reason), administration within the separation-of-duties
rules, and audit verification. Each goes through the console's own services, so the same rules
hold and the same audit events are written."""

from __future__ import annotations

import pytest

from app.db.models import ApiToken, Connection, ExceptionItem, User
from app.db.session import transaction
from tests.conftest import PASSWORD


@pytest.fixture
def api(client, make_tokens):
    """api(who, method, path, json=None) -> response, with `who`'s bearer token."""
    tokens = make_tokens("rita", "ravi", "lena", "leo", "audrey", "adam")

    def call(who: str, method: str, path: str, json=None):
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        return client.open(f"/api/v1{path}", method=method, json=json, headers=headers)

    return call


def _state(sessions, exc_id: int) -> str:
    with transaction(sessions) as s:
        return s.get(ExceptionItem, exc_id).state


def _pending_replay(api, exc_id: int) -> int:
    [replay] = [r for r in api("rita", "GET", "/replays?state=pending_approval").json["items"]]
    assert replay["exception_id"] == exc_id
    return replay["id"]


# --- bulk decisions -------------------------------------------------------------------------------


def test_bulk_decisions_apply_to_exactly_the_listed_ids_each_on_its_own(api, make, sessions, audit_events):
    first, second, stale, untouched = make(), make(), make(), make()
    r = api(
        "rita",
        "POST",
        "/exceptions/bulk-decisions",
        {
            "action": "escalate",
            "ids": [first, second, stale, 999_999],
            "expected_versions": {str(stale): 7},
            "reason": "EHR team asked",
        },
    )
    assert r.status_code == 200, r.json
    by_id = {row["exception_id"]: row for row in r.json["results"]}
    assert r.json["applied"] == 2 and r.json["failed"] == 2
    assert by_id[first]["ok"] and by_id[first]["state"] == "escalated"
    assert (by_id[stale]["status"], by_id[stale]["code"]) == (409, "version_conflict")
    assert by_id[999_999]["status"] == 404
    assert [_state(sessions, i) for i in (first, second, stale, untouched)] == [
        "escalated",
        "escalated",
        "open",
        "open",
    ]
    assert {e.subject_id for e in audit_events(action="decision.escalate")} == {str(first), str(second)}


def test_bulk_decisions_refuse_approve_duplicates_and_more_than_200(api, make):
    exc_id = make()
    for body, code in [
        ({"action": "approve", "ids": [exc_id], "password": PASSWORD}, "invalid_action"),
        ({"action": "discard", "ids": [exc_id, exc_id], "reason": "dup"}, "invalid_body"),
        ({"action": "discard", "ids": list(range(1, 202)), "reason": "x"}, "too_many"),
        ({"action": "discard", "ids": "1,2"}, "invalid_body"),
    ]:
        r = api("rita", "POST", "/exceptions/bulk-decisions", body)
        assert (r.status_code, r.json["error"]["code"]) == (422, code), body


def test_bulk_discard_needs_a_reason_code_per_item(api, make, sessions):
    exc_id = make()
    r = api(
        "rita", "POST", "/exceptions/bulk-decisions", {"action": "discard", "ids": [exc_id], "reason": "x"}
    )
    assert r.json["results"][0]["status"] == 422 and _state(sessions, exc_id) == "open"


def test_bulk_decisions_need_the_decide_permission(api, make):
    assert (
        api(
            "audrey", "POST", "/exceptions/bulk-decisions", {"action": "escalate", "ids": [make()]}
        ).status_code
        == 403
    )


# --- replays --------------------------------------------------------------------------------------


def test_a_replay_is_approved_through_the_api_with_the_password_and_never_by_its_requester(
    api, make, sessions, audit_events
):
    exc_id = make()
    assert (
        api(
            "lena", "POST", f"/exceptions/{exc_id}/decisions", {"action": "resubmit", "reason": "fixed"}
        ).status_code
        == 201
    )
    replay_id = _pending_replay(api, exc_id)
    assert api("rita", "GET", f"/replays/{replay_id}").json["requested_by"] == "lena"

    own = api("lena", "POST", f"/replays/{replay_id}/approve", {"password": PASSWORD})
    assert own.status_code == 403
    wrong = api("leo", "POST", f"/replays/{replay_id}/approve", {"password": "not it"})
    assert (wrong.status_code, wrong.json["error"]["code"]) == (403, "password_required")
    assert len(audit_events(action="approval.password_failed")) == 1  # counted, like the console
    assert api("rita", "POST", f"/replays/{replay_id}/approve", {"password": PASSWORD}).status_code == 403

    ok = api("leo", "POST", f"/replays/{replay_id}/approve", {"password": PASSWORD})
    assert ok.status_code == 201, ok.json
    assert ok.json["replay"]["state"] == "queued" and ok.json["replay"]["approved_by"] == "leo"
    assert ok.json["state"] == _state(sessions, exc_id) == "replaying"
    again = api("leo", "POST", f"/replays/{replay_id}/approve", {"password": PASSWORD})
    assert again.status_code == 409
    [event] = audit_events(action="decision.approve")
    assert event.actor == "leo" and event.details["replay_id"] == replay_id


def test_a_replay_is_rejected_with_a_reason(api, make, sessions):
    exc_id = make()
    api("rita", "POST", f"/exceptions/{exc_id}/decisions", {"action": "resubmit", "reason": "try again"})
    replay_id = _pending_replay(api, exc_id)
    assert api("lena", "POST", f"/replays/{replay_id}/reject", {}).status_code == 422
    r = api("lena", "POST", f"/replays/{replay_id}/reject", {"reason": "wrong patient"})
    assert r.status_code == 201 and r.json["replay"]["state"] == "rejected"
    assert _state(sessions, exc_id) == "open"
    assert api("rita", "GET", "/replays?state=pending_approval").json["items"] == []
    assert api("rita", "GET", "/replays?state=bogus").status_code == 422


def test_replays_page_newest_first_with_a_cursor(api, make):
    for _ in range(3):
        api("rita", "POST", f"/exceptions/{make()}/decisions", {"action": "resubmit", "reason": "r"})
    first = api("rita", "GET", "/replays?limit=2").json
    rest = api("rita", "GET", f"/replays?limit=2&cursor={first['next_cursor']}").json
    ids = [r["id"] for r in first["items"] + rest["items"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 3 and rest["next_cursor"] is None


# --- administration -------------------------------------------------------------------------------


def test_an_admin_configures_customers_connections_and_sla_rules_through_the_api(api, audit_events):
    assert api("adam", "POST", "/customers", {"name": "Lakeside"}).status_code == 201
    body = {
        "name": "lake-fhir",
        "customer": "Lakeside",
        "protocol": "fhir-r4",
        "endpoint": "https://ehr.example/fhir",
    }
    created = api("adam", "POST", "/connections", body)
    assert created.status_code == 201 and created.json["enabled"] and created.json["circuit"] == "closed"
    conn_id = created.json["id"]
    assert api("adam", "POST", "/connections", body).status_code == 409
    bad = api("adam", "POST", "/connections", body | {"name": "evil", "endpoint": "javascript:alert(1)"})
    assert bad.status_code == 422

    no_reason = api("adam", "PATCH", f"/connections/{conn_id}", {"enabled": False})
    assert (no_reason.status_code, no_reason.json["error"]["code"]) == (422, "reason_required")
    r = api(
        "adam",
        "PATCH",
        f"/connections/{conn_id}",
        {"enabled": False, "max_auto_retries": 5, "reason": "EHR upgrade"},
    )
    assert r.status_code == 200 and r.json["enabled"] is False and r.json["max_auto_retries"] == 5
    assert api("adam", "PATCH", f"/connections/{conn_id}", {"max_auto_retries": 99}).status_code == 422
    assert api("adam", "PATCH", f"/connections/{conn_id}", {"enabled": "no"}).status_code == 422
    assert [c["name"] for c in api("adam", "GET", "/connections").json["items"]] == ["lake-fhir"]
    [disabled] = audit_events(action="connection.disable")
    assert (disabled.actor, disabled.reason) == ("adam", "EHR upgrade")
    assert audit_events(action="connection.retry_policy")

    # Ordering (issue 6): sequence-sensitive on create and on change, audited; a pause shows.
    ordered = api("adam", "POST", "/connections", body | {"name": "lake-adt", "sequence_sensitive": True})
    assert ordered.status_code == 201 and ordered.json["sequence_sensitive"] is True
    assert ordered.json["paused"] is None and created.json["sequence_sensitive"] is False
    r = api("adam", "PATCH", f"/connections/{conn_id}", {"sequence_sensitive": True})
    assert r.status_code == 200 and r.json["sequence_sensitive"] is True
    assert api("adam", "PATCH", f"/connections/{conn_id}", {"sequence_sensitive": "yes"}).status_code == 422
    assert any(e.details.get("sequence_sensitive") is True for e in audit_events(action="connection.update"))
    paused = api("adam", "POST", f"/connections/{conn_id}/pause", {"reason": "EHR downtime"})
    assert paused.status_code == 200 and paused.json["paused"]["reason"] == "EHR downtime"
    assert api("adam", "GET", f"/connections/{conn_id}").json["paused"]["by"] == "adam"

    rule = api(
        "adam",
        "POST",
        "/sla-rules",
        {"category": "transport", "risk": "high", "customer": "Lakeside", "minutes": 20},
    )
    assert rule.status_code == 201 and rule.json["customer"] == "Lakeside"
    assert api("adam", "PATCH", f"/sla-rules/{rule.json['id']}", {"minutes": 25}).json["minutes"] == 25
    assert api("adam", "GET", "/sla-rules").json["items"][0]["minutes"] == 25
    assert api("adam", "DELETE", f"/sla-rules/{rule.json['id']}").status_code == 422  # no reason
    assert api("adam", "DELETE", f"/sla-rules/{rule.json['id']}?reason=superseded").status_code == 204
    assert api("adam", "GET", "/sla-rules").json["items"] == []
    assert [e.action for e in audit_events(subject_type="sla_rule")] == [
        "sla_rule.create",
        "sla_rule.update",
        "sla_rule.delete",
    ]


def test_test_connection_probes_only_the_stored_endpoint_and_is_audited(
    api, sessions, connection, audit_events, monkeypatch
):
    from app.adapters.ehr import base

    probed = []
    monkeypatch.setattr(base, "adapter_for", lambda settings: probed.append(settings.endpoint))
    with transaction(sessions) as s:
        s.get(Connection, connection.id).endpoint = "javascript:alert(1)"
    r = api("adam", "POST", f"/connections/{connection.id}/test", {"endpoint": "http://10.0.0.1:22"})
    assert r.status_code == 200 and r.json["ok"] is False and "not probed" in r.json["detail"]
    assert probed == [] and audit_events(action="connection.test")[0].actor == "adam"


def test_admins_mint_tokens_for_service_accounts_only(api, client, sessions, audit_events):
    refused = api("adam", "POST", "/tokens", {"user": "lena"})
    assert (refused.status_code, refused.json["error"]["code"]) == (403, "token_for_person")
    created = api("adam", "POST", "/tokens", {"user": "svc", "days": 7})
    assert created.status_code == 201 and created.json["user"] == "svc"
    token = created.json["token"]
    assert client.get("/api/v1/replays", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    listed = api("adam", "GET", "/tokens").json["items"]
    assert all("token" not in t for t in listed) and created.json["id"] in {t["id"] for t in listed}
    assert api("adam", "POST", f"/tokens/{created.json['id']}/revoke").status_code == 422  # no reason
    assert (
        api("adam", "POST", f"/tokens/{created.json['id']}/revoke", {"reason": "rotated"}).status_code == 200
    )
    assert client.get("/api/v1/messages/x", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert api("adam", "POST", f"/tokens/{created.json['id']}/revoke", {"reason": "again"}).status_code == 409
    with transaction(sessions) as s:
        assert s.get(ApiToken, created.json["id"]).revoked_at is not None


def test_an_admin_creates_people_with_an_enrollment_link_never_a_password(
    api, client, sessions, audit_events
):
    refused = api(
        "adam", "POST", "/users", {"username": "nia", "role": "clinical_lead", "password": "chosen-by-admin"}
    )
    # the password field is not part of the API: the account is made without one
    assert refused.status_code == 201 and refused.json["enrollment_url"].startswith("http")
    with transaction(sessions) as s:
        nia = s.query(User).filter_by(username="nia").one()
        assert nia.password_hash is None and nia.created_by_id is not None
    assert audit_events(action="user.clinical_lead_grant")
    service = api("adam", "POST", "/users", {"username": "engine", "role": "service"})
    assert service.status_code == 201 and "enrollment_url" not in service.json
    assert api("adam", "POST", "/users", {"username": "x", "role": "wizard"}).status_code == 422

    user_id = refused.json["user"]["id"]
    assert api("adam", "POST", f"/users/{user_id}/reset").status_code == 422  # no reason
    reset = api("adam", "POST", f"/users/{user_id}/reset", {"reason": "lost phone"})
    assert reset.status_code == 200 and reset.json["enrollment_url"] != refused.json["enrollment_url"]
    assert api("adam", "PATCH", f"/users/{user_id}", {"role": "reviewer"}).json["role"] == "reviewer"
    assert api("adam", "PATCH", f"/users/{user_id}", {"active": False}).status_code == 422  # no reason
    assert (
        api("adam", "PATCH", f"/users/{user_id}", {"active": False, "reason": "left"}).json["active"] is False
    )
    assert audit_events(action="user.deactivate")[0].reason == "left"
    me = next(u for u in api("adam", "GET", "/users").json["items"] if u["username"] == "adam")
    assert api("adam", "PATCH", f"/users/{me['id']}", {"active": False, "reason": "x"}).status_code == 409
    assert api("adam", "PATCH", f"/users/{me['id']}", {"role": "reviewer"}).status_code == 409
    assert api("adam", "POST", f"/users/{user_id}/approval-lock/clear").status_code == 409  # not locked


def test_administration_is_for_admins_only(api):
    for who in ("rita", "lena", "audrey", "svc"):
        assert api(who, "GET", "/users").status_code == 403, who
        assert api(who, "POST", "/tokens", {"user": "svc"}).status_code == 403, who


# --- audit verify ---------------------------------------------------------------------------------


def test_audit_verify_returns_the_chain_result(api, make):
    make()
    r = api("audrey", "POST", "/audit/verify")
    assert r.status_code == 200 and r.json["ok"] is True and r.json["events"] > 0
    assert len(r.json["head"]) == 64 and r.json["broken_event_id"] is None
    assert api("rita", "POST", "/audit/verify").status_code == 403


def test_ids_past_the_id_column_are_404_on_every_api_route(app, api):
    """2^31 cannot name a row (32-bit id columns on PostgreSQL): 404, never an overflow 500."""
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or "<int:" not in rule.rule:
            continue
        url = rule.rule.removeprefix("/api/v1")
        for arg in rule.arguments:
            url = url.replace(f"<int:{arg}>", str(2**31)).replace(f"<{arg}>", "approve")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            statuses = {api(who, method, url, json={}).status_code for who in ("lena", "adam")}
            assert 404 in statuses and statuses <= {403, 404}, (method, url, statuses)
