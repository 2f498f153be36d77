"""SPEC 5 Admin: users, tokens, customers and connections, SLA policy; every change audited."""

from __future__ import annotations

import html as html_lib
import re

import pytest
import sqlalchemy as sa

from app.db.models import ApiToken, Connection, SlaRuleRow, User
from app.db.session import transaction
from app.services import admin
from app.services.users import user_for_token
from app.web.admin import routes as admin_routes


def test_admin_creates_a_user_and_it_is_audited(login, post, sessions, audit_events):
    client = login("adam")
    # a password in the form is not used: an admin never sets another person's password
    response = post("/admin/users", {"username": "nora", "role": "reviewer", "password": "long enough pw"})
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert re.search(
        r"<code class=\"token\" data-enrollment-link>[^<]*/enroll/[^<]+</code>",
        response.get_data(as_text=True),
    )
    assert "nora" in client.get("/admin/users").get_data(as_text=True)
    [event] = audit_events(action="user.create", actor="adam")
    assert event.details == {"username": "nora", "role": "reviewer"}
    with transaction(sessions) as s:
        nora = s.scalar(sa.select(User).where(User.username == "nora"))
        assert nora.password_hash is None and nora.created_by_id is not None


def test_user_form_errors_are_422_messages(login, post):
    login("adam")
    response = post("/admin/users", {"username": "", "role": "reviewer"})
    assert response.status_code == 422 and "required" in response.get_data(as_text=True).lower()
    response = post(
        "/admin/users", {"username": "bad name!", "role": "reviewer", "password": "long enough pw"}
    )
    assert response.status_code == 422 and "letters, digits" in response.get_data(as_text=True)
    response = post("/admin/users", {"username": "rita", "role": "reviewer", "password": "long enough pw"})
    assert response.status_code == 409 and "exists" in response.get_data(as_text=True)


def test_admin_deactivates_a_user_but_not_themselves(login, post, users, sessions, audit_events, auth):
    login("adam")
    deactivate = {"active": "0", "reason": "left the team"}
    assert post(f"/admin/users/{users['ravi'].id}/active", deactivate).status_code == 303
    with transaction(sessions) as s:
        assert not s.get(User, users["ravi"].id).active
    [event] = audit_events(action="user.deactivate")
    assert (event.subject_id, event.reason) == (str(users["ravi"].id), "left the team")
    response = post(f"/admin/users/{users['adam'].id}/active", deactivate)
    assert response.status_code == 409 and "your own account" in response.get_data(as_text=True)
    assert auth.login("ravi").status_code == 401  # deactivated users cannot log in


def test_admin_creates_a_token_shown_once_and_revokes_it(login, post, users, sessions, audit_events):
    client = login("adam")
    response = post("/admin/tokens", {"user_id": str(users["svc"].id)})
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    token = re.search(r"<code class=\"token\" data-new-token>([^<]+)</code>", html).group(1)
    with transaction(sessions) as s:
        assert user_for_token(s, token).username == "svc"
        row = s.scalar(sa.select(ApiToken).order_by(ApiToken.id.desc()))
    assert token not in client.get("/admin/tokens").get_data(as_text=True)  # never shown again
    assert post(f"/admin/tokens/{row.id}/revoke", {"reason": "rotated"}).status_code == 303
    with transaction(sessions) as s:
        assert user_for_token(s, token) is None
    assert audit_events(action="token.create", actor="adam") and audit_events(
        action="token.revoke", actor="adam"
    )
    assert post(f"/admin/tokens/{row.id}/revoke", {"reason": "again"}).status_code == 409


def test_admin_adds_a_customer_and_a_connection(login, post, sessions, audit_events):
    client = login("adam")
    assert post("/admin/customers", {"name": "Lakeside"}).status_code == 303
    data = {
        "name": "lakeside-athena",
        "customer": "Lakeside",
        "protocol": "fhir-r4",
        "endpoint": "http://ehr.invalid/fhir",
        "environment": "test",
        "vendor": "athena",
        "conditional_create": "y",
        "message_types": "Observation, MedicationRequest",
    }
    assert post("/admin/connections", data).status_code == 303
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "lakeside-athena"))
        assert conn.environment == "test" and conn.supports_conditional_create
        assert not conn.supports_identifier_search  # unchecked box
        assert conn.enabled_message_types == ["Observation", "MedicationRequest"]
    assert audit_events(action="customer.create", actor="adam")
    assert audit_events(action="connection.create", actor="adam")
    assert "lakeside-athena" in client.get("/admin/connections").get_data(as_text=True)
    response = post("/admin/connections", dict(data, endpoint=""))
    assert response.status_code == 422


def test_admin_disables_a_connection_and_it_is_audited(login, post, connection, sessions, audit_events):
    login("adam")
    disable = {"active": "0", "reason": "EHR maintenance window"}
    assert post(f"/admin/connections/{connection.id}/enabled", disable).status_code == 303
    with transaction(sessions) as s:
        assert not s.get(Connection, connection.id).enabled
    [event] = audit_events(action="connection.disable")
    assert (event.actor, event.subject_id, event.to_state) == ("adam", str(connection.id), "disabled")
    assert event.reason == "EHR maintenance window"
    assert post(f"/admin/connections/{connection.id}/enabled", {"active": "1"}).status_code == 303
    assert audit_events(action="connection.enable")


def test_test_connection_reports_a_failure_without_a_500(login, post, connection, audit_events):
    client = login("adam")
    response = post(f"/admin/connections/{connection.id}/test")
    assert response.status_code == 303
    page = client.get("/admin/connections").get_data(as_text=True)
    assert "connection test failed" in page or "connection OK" in page
    [event] = audit_events(action="connection.test")
    assert event.actor == "adam" and "ok" in event.details


def test_reset_circuit_and_retry_policy_are_audited(login, post, connection, sessions, audit_events):
    from datetime import datetime

    with transaction(sessions) as s:
        s.get(Connection, connection.id).circuit_open_until = datetime(2999, 1, 1)
        s.get(Connection, connection.id).consecutive_failures = 7
    client = login("adam")
    assert ">open<" in client.get("/admin/connections").get_data(as_text=True)
    assert post(f"/admin/connections/{connection.id}/circuit").status_code == 303
    with transaction(sessions) as s:
        conn = s.get(Connection, connection.id)
        assert conn.circuit_open_until is None and conn.consecutive_failures == 0
    assert audit_events(action="connection.circuit_reset")[0].details["consecutive_failures"] == 7
    data = {
        "max_auto_retries": "0",
        "retry_backoff_seconds": "5",
        "circuit_failure_threshold": "3",
        "circuit_cooldown_seconds": "120",
    }
    assert post(f"/admin/connections/{connection.id}/retry", data).status_code == 303
    [event] = audit_events(action="connection.retry_policy")
    assert event.details["changes"]["max_auto_retries"] == {"from": 3, "to": 0}
    assert (
        post(f"/admin/connections/{connection.id}/retry", dict(data, max_auto_retries="99")).status_code
        == 422
    )


def test_admin_adds_edits_and_deletes_an_sla_rule_all_audited(
    login, post, connection, sessions, audit_events
):
    client = login("adam")
    html = client.get("/admin/sla").get_data(as_text=True)
    assert "Built-in defaults" in html and ">15<" in html and ">30<" in html and ">240<" in html
    data = {
        "category": "ehr_rejected",
        "risk": "high",
        "customer_id": str(connection.customer_id),
        "minutes": "20",
    }
    assert post("/admin/sla", data).status_code == 303
    with transaction(sessions) as s:
        rule = s.scalar(sa.select(SlaRuleRow))
        assert (rule.category, rule.risk, rule.customer_id, rule.minutes) == (
            "ehr_rejected",
            "high",
            connection.customer_id,
            20,
        )
    [created] = audit_events(action="sla_rule.create")
    assert created.actor == "adam" and created.details["customer"] == "Mercy Health"
    assert post("/admin/sla", data).status_code == 409  # same key twice
    assert post("/admin/sla", dict(data, minutes="0")).status_code == 422
    assert post(f"/admin/sla/{rule.id}", {"minutes": "25"}).status_code == 303
    assert audit_events(action="sla_rule.update")[0].details["minutes"] == {"from": 20, "to": 25}
    assert post(f"/admin/sla/{rule.id}/delete", {"reason": "policy simplified"}).status_code == 303
    assert audit_events(action="sla_rule.delete")[0].reason == "policy simplified"
    with transaction(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(SlaRuleRow)) == 0


def test_an_sla_rule_changes_the_due_time_of_new_exceptions(login, post, connection, make, sessions):
    from app.db.models import ExceptionItem

    login("adam")
    post("/admin/sla", {"category": "ehr_rejected", "risk": "", "customer_id": "", "minutes": "90"})
    exc_id = make()
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        assert (item.sla_due_at - item.sla_started_at).total_seconds() == 90 * 60


def test_admin_overview(login, connection):
    html = login("adam").get("/admin").get_data(as_text=True)
    assert "mercy-epic" in html and "active of" in html


DESTRUCTIVE = {
    # action: (url, extra form fields, audit action)
    "deactivate a user": ("/admin/users/{ravi}/active", {"active": "0"}, "user.deactivate"),
    "reset a password": ("/admin/users/{ravi}/reset", {}, "user.password_reset"),
    "revoke a token": ("/admin/tokens/{token}/revoke", {}, "token.revoke"),
    "disable a connection": (
        "/admin/connections/{connection}/enabled",
        {"active": "0"},
        "connection.disable",
    ),
    "delete an SLA rule": ("/admin/sla/{rule}/delete", {}, "sla_rule.delete"),
    "pause a connection": ("/admin/connections/{connection}/pause", {}, "connection.paused"),
}


@pytest.fixture
def targets(users, connection, sessions):
    """Ids of one thing of each kind a destructive admin action acts on."""
    with transaction(sessions) as s:
        rule = admin.add_sla_rule(s, minutes=30, category="transport", actor="test")
        token = s.scalar(sa.select(ApiToken.id).where(ApiToken.user_id == users["svc"].id))
    return {"ravi": users["ravi"].id, "token": token, "connection": connection.id, "rule": rule.id}


@pytest.mark.parametrize("name", DESTRUCTIVE)
def test_destructive_admin_actions_refuse_without_a_reason_and_audit_it(
    name, login, post, targets, audit_events
):
    url, fields, audited = DESTRUCTIVE[name]
    url = url.format(**targets)
    login("adam")
    for blank in ({}, {"reason": "   "}):
        response = post(url, {**fields, **blank})
        assert response.status_code == 422, name
        assert "say why" in response.get_data(as_text=True)
    assert audit_events(action=audited) == []  # nothing happened
    response = post(url, {**fields, "reason": "ticket OPS-42"})
    assert response.status_code in (200, 303), name
    [event] = audit_events(action=audited)
    assert (event.actor, event.reason) == ("adam", "ticket OPS-42")


def test_destructive_admin_buttons_ask_for_confirmation_and_a_reason_first(login, targets):
    client = login("adam")
    for page, key in (
        ("/admin/users", f"deactivate-{targets['ravi']}"),
        ("/admin/users", f"reset-{targets['ravi']}"),
        ("/admin/tokens", f"revoke-{targets['token']}"),
        ("/admin/connections", f"disable-{targets['connection']}"),
        ("/admin/sla", f"delete-{targets['rule']}"),
        ("/admin/connections", f"pause-{targets['connection']}"),
    ):
        html = client.get(page).get_data(as_text=True)
        block = re.search(rf'<details class="confirm" data-confirm="{key}">.*?</details>', html, re.S)
        assert block, (page, key)  # the first click only opens the confirmation
        assert re.search(r'<input type="text" name="reason" required', block.group(0)), key
        assert block.group(0).count('type="submit"') == 1


def test_admin_routes_run_no_queries_and_import_no_models():
    import ast
    from pathlib import Path

    source = Path(admin_routes.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {m for m in imported if m.startswith(("app.db", "sqlalchemy"))}, imported
    for query in ("s.get(", "s.scalar", "s.execute", "select("):
        assert query not in source, query


def test_admin_pauses_and_resumes_a_connection_with_reasons_audited(login, post, connection, audit_events):
    client = login("adam")
    assert (
        post(f"/admin/connections/{connection.id}/pause", {"reason": "EHR upgrade tonight"}).status_code
        == 303
    )
    page = html_lib.unescape(client.get("/admin/connections").get_data(as_text=True))
    notice = re.search(rf'<p class="callout warn small" data-paused="{connection.id}">(.*?)</p>', page, re.S)
    assert "Paused</strong> by adam" in notice.group(1) and "EHR upgrade tonight" in notice.group(1)
    assert (
        f'data-confirm="resume-{connection.id}"' in page
        and f'data-confirm="pause-{connection.id}"' not in page
    )
    assert post(f"/admin/connections/{connection.id}/resume", {}).status_code == 422  # a reason first
    assert post(f"/admin/connections/{connection.id}/resume", {"reason": "upgrade done"}).status_code == 303
    assert [e.reason for e in audit_events(action="connection.paused")] == ["EHR upgrade tonight"]
    assert [e.reason for e in audit_events(action="connection.resumed")] == ["upgrade done"]
    again = post(f"/admin/connections/{connection.id}/resume", {"reason": "twice"})
    assert again.status_code == 409 and "not paused" in again.get_data(as_text=True)
