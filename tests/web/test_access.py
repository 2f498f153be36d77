"""SPEC 3.4: one server-side access check; every console page for every role; CSRF on every change."""

from __future__ import annotations

# Which role may open which page is tests/web/test_rbac_matrix.py: a table written out there,
# independently of app/domain/roles.py, for every console and API route and every role.


def test_service_user_cannot_log_in_to_the_console(auth, client, users):
    response = auth.login("svc", "anything")
    assert response.status_code == 401
    assert client.get("/").status_code == 302


def test_pages_link_only_to_what_the_role_may_open(login):
    html = login("audrey").get("/").get_data(as_text=True)
    assert 'href="/audit"' in html and 'href="/admin"' not in html and 'href="/approvals"' not in html


STATE_CHANGING = [
    ("lena", "/exceptions/{id}/decide", {"action": "comment", "reason": "x"}),
    ("lena", "/exceptions/{id}/correct", {"payload": "{}", "reason": "x", "submit": "1"}),
    ("lena", "/exceptions/{id}/diff", {"payload": "{}"}),
    ("lena", "/queues/bulk", {"ids": "{id}", "action": "claim", "confirm": "1"}),
    ("lena", "/queues/views", {"name": "mine", "queue": "all"}),
    ("lena", "/queues/views/1/delete", {}),
    ("lena", "/approvals/{id}", {"action": "reject", "reason": "x"}),
    ("lena", "/drift/1/acknowledge", {}),
    ("adam", "/admin/users", {"username": "eve", "role": "reviewer"}),
    ("adam", "/admin/users/1/active", {"active": "0"}),
    ("adam", "/admin/users/1/reset", {}),
    ("adam", "/admin/users/1/role", {"role": "clinical_lead"}),
    ("adam", "/admin/users/1/approval-lock", {}),
    ("lena", "/account/tokens", {"days": "30"}),
    ("lena", "/account/tokens/1/revoke", {}),
    ("lena", "/enroll/not-a-real-link", {"password": "longenough1", "confirm": "longenough1"}),
    ("adam", "/admin/tokens", {"user_id": "1"}),
    ("adam", "/admin/tokens/1/revoke", {}),
    ("adam", "/admin/customers", {"name": "Acme"}),
    (
        "adam",
        "/admin/connections",
        {"name": "x", "customer": "Mercy Health", "protocol": "fhir-r4", "endpoint": "http://x"},
    ),
    ("adam", "/admin/connections/1/enabled", {"active": "0"}),
    ("adam", "/admin/connections/1/pause", {"reason": "maintenance"}),
    ("adam", "/admin/connections/1/resume", {"reason": "back"}),
    ("adam", "/admin/connections/1/test", {}),
    ("adam", "/admin/connections/1/circuit", {}),
    ("adam", "/admin/connections/1/retry", {"max_auto_retries": "1"}),
    ("adam", "/admin/sla", {"minutes": "10"}),
    ("adam", "/admin/sla/1", {"minutes": "10"}),
    ("adam", "/admin/sla/1/delete", {}),
]


def test_every_state_changing_console_route_refuses_a_missing_csrf_token(login, make, audit_events, app):
    exc_id = make()
    posted = set()
    client, current = None, None
    for name, url, data in sorted(STATE_CHANGING, key=lambda row: row[0]):
        if name != current:  # log in once per role (argon2 is deliberately slow)
            client, current = login(name), name
        before = len(audit_events())
        data = {k: v.replace("{id}", str(exc_id)) for k, v in data.items()}
        response = client.post(url.replace("{id}", str(exc_id)), data=data)
        assert response.status_code == 400, (url, response.status_code)
        assert "CSRF" in response.get_data(as_text=True)
        assert len(audit_events()) == before, url
        posted.add(url)
    # The list above covers every POST route of the console blueprints.
    console = {"dashboard", "queues", "exceptions", "approvals", "audit", "admin", "account"}
    routes = {
        r.rule.replace("<int:exception_id>", "{id}")
        .replace("<secret>", "not-a-real-link")
        .replace("<int:user_id>", "1")
        .replace("<int:token_id>", "1")
        .replace("<int:connection_id>", "1")
        .replace("<int:rule_id>", "1")
        .replace("<int:flag_id>", "1")
        .replace("<int:view_id>", "1")
        for r in app.url_map.iter_rules()
        if "POST" in r.methods and r.endpoint.split(".")[0] in console
    }
    assert routes <= posted, routes - posted


def test_every_console_view_declares_its_access_rule(app):
    console = {"dashboard", "queues", "exceptions", "approvals", "audit", "admin", "account"}
    for endpoint, view in app.view_functions.items():
        if endpoint.split(".")[0] in console:
            assert getattr(view, "required_permissions", None), endpoint


def test_every_view_declares_its_access_rule(app):
    """Deny by default is the backstop; this keeps every view's rule explicit."""
    undeclared = [
        endpoint
        for endpoint, view in app.view_functions.items()
        if endpoint != "static" and not getattr(view, "required_permissions", None)
    ]
    assert undeclared == []
