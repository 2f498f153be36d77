"""Issue 7: a role × route matrix, written out here independently of the permission code
(app/domain/roles.py and the @requires declarations are not consulted), checked against real
requests through the Flask test client, and a check that no route of the URL map is missing
from it — a new route cannot escape the table.

Roles: anonymous (no session, no token); reviewer, clinical_lead, auditor and admin (a console
session for console routes, their own bearer token for API routes); service (cannot log in:
its bearer token on console routes, which ignore it).

Expected outcome of each cell:
  OK     the access check lets it through (the view answers: 2xx, 3xx elsewhere, 404, 422 ...)
  DENY   403
  LOGIN  redirected to the login page (302 to /login, with next= back to a page); POST /logout
         redirects there too, after the view ran: its cells are told apart by the auth.logout
         event the view writes
  AUTH   401 (API without a usable token)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.conftest import PASSWORD, csrf_token

OK, DENY, LOGIN, AUTH = "OK", "DENY", "LOGIN", "AUTH"
ROLES = ("anonymous", "reviewer", "clinical_lead", "auditor", "admin", "service")
PEOPLE = {"reviewer": "rita", "clinical_lead": "lena", "auditor": "audrey", "admin": "adam"}

_PUBLIC = (OK, OK, OK, OK, OK, OK)
_ANY_USER = (LOGIN, OK, OK, OK, OK, LOGIN)
_DECIDERS = (LOGIN, OK, OK, DENY, DENY, LOGIN)
_LEADS = (LOGIN, DENY, OK, DENY, DENY, LOGIN)
_AUDIT_READERS = (LOGIN, DENY, DENY, OK, OK, LOGIN)
_EXPORTERS = (LOGIN, DENY, DENY, OK, DENY, LOGIN)
_ADMINS = (LOGIN, DENY, DENY, DENY, OK, LOGIN)
_PAYLOAD_READERS = (LOGIN, OK, OK, OK, DENY, LOGIN)

_API_QUEUE_READERS = (AUTH, OK, OK, OK, OK, DENY)
_API_DECIDERS = (AUTH, OK, OK, DENY, DENY, DENY)
_API_LEADS = (AUTH, DENY, OK, DENY, DENY, DENY)
_API_PAYLOAD_READERS = (AUTH, OK, OK, OK, DENY, DENY)
_API_AUDIT_READERS = (AUTH, DENY, DENY, OK, OK, DENY)
_API_EXPORTERS = (AUTH, DENY, DENY, OK, DENY, DENY)
_API_ADMINS = (AUTH, DENY, DENY, DENY, OK, DENY)
_API_SERVICES = (AUTH, DENY, DENY, DENY, DENY, OK)
_API_MESSAGE_READERS = (AUTH, DENY, DENY, DENY, OK, OK)

# (method, rule) -> expected per role, in ROLES order.
#                                                      anon   rev    lead   aud    admin  service
MATRIX: dict[tuple[str, str], tuple[str, ...]] = {
    # --- console --------------------------------------------------------------------------------
    ("GET", "/"): _ANY_USER,
    ("GET", "/queues"): _ANY_USER,
    ("GET", "/queues/<queue>"): _ANY_USER,
    ("POST", "/queues/bulk"): _DECIDERS,
    ("GET", "/queues/changes"): _ANY_USER,
    ("GET", "/queues/<queue>/export.csv"): _ANY_USER,
    ("POST", "/queues/views"): _ANY_USER,
    ("POST", "/queues/views/<int:view_id>/delete"): _ANY_USER,
    ("GET", "/exceptions/<int:exception_id>"): _ANY_USER,
    ("GET", "/exceptions/<int:exception_id>/payload"): _PAYLOAD_READERS,
    ("GET", "/exceptions/<int:exception_id>/correct"): _DECIDERS,
    ("POST", "/exceptions/<int:exception_id>/correct"): _DECIDERS,
    ("POST", "/exceptions/<int:exception_id>/diff"): _DECIDERS,
    ("POST", "/exceptions/<int:exception_id>/decide"): _DECIDERS,
    ("GET", "/approvals"): _LEADS,
    ("GET", "/approvals/<int:exception_id>"): _LEADS,
    ("POST", "/approvals/<int:exception_id>"): _LEADS,
    ("GET", "/replays"): _ANY_USER,
    ("GET", "/bulk-replays"): _ANY_USER,
    ("POST", "/bulk-replays/new"): _DECIDERS,
    ("POST", "/bulk-replays"): _DECIDERS,
    ("GET", "/bulk-replays/<int:bulk_replay_id>"): _ANY_USER,
    ("GET", "/bulk-replays/<int:bulk_replay_id>/progress"): _ANY_USER,
    ("POST", "/bulk-replays/<int:bulk_replay_id>/<action>"): _DECIDERS,
    ("GET", "/drift"): _ANY_USER,
    ("POST", "/drift/<int:flag_id>/acknowledge"): _DECIDERS,
    ("GET", "/audit"): _AUDIT_READERS,
    ("GET", "/audit/verify"): _AUDIT_READERS,
    ("GET", "/audit/export"): _EXPORTERS,
    ("GET", "/account/tokens"): _ANY_USER,
    ("POST", "/account/tokens"): _ANY_USER,
    ("POST", "/account/tokens/<int:token_id>/revoke"): _ANY_USER,
    ("GET", "/admin"): _ADMINS,
    ("GET", "/admin/users"): _ADMINS,
    ("POST", "/admin/users"): _ADMINS,
    ("POST", "/admin/users/<int:user_id>/active"): _ADMINS,
    ("POST", "/admin/users/<int:user_id>/approval-lock"): _ADMINS,
    ("POST", "/admin/users/<int:user_id>/reset"): _ADMINS,
    ("POST", "/admin/users/<int:user_id>/role"): _ADMINS,
    ("GET", "/admin/tokens"): _ADMINS,
    ("POST", "/admin/tokens"): _ADMINS,
    ("POST", "/admin/tokens/<int:token_id>/revoke"): _ADMINS,
    ("POST", "/admin/customers"): _ADMINS,
    ("GET", "/admin/connections"): _ADMINS,
    ("POST", "/admin/connections"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/circuit"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/enabled"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/pause"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/resume"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/retry"): _ADMINS,
    ("POST", "/admin/connections/<int:connection_id>/test"): _ADMINS,
    ("GET", "/admin/sla"): _ADMINS,
    ("POST", "/admin/sla"): _ADMINS,
    ("POST", "/admin/sla/<int:rule_id>"): _ADMINS,
    ("POST", "/admin/sla/<int:rule_id>/delete"): _ADMINS,
    ("GET", "/login"): _PUBLIC,
    ("POST", "/login"): _PUBLIC,
    ("GET", "/enroll/<secret>"): _PUBLIC,
    ("POST", "/enroll/<secret>"): _PUBLIC,
    ("GET", "/healthz"): _PUBLIC,
    ("GET", "/readyz"): _PUBLIC,
    ("GET", "/metrics"): _PUBLIC,  # without RECON_METRICS_TOKEN: loopback clients (this one) only
    ("GET", "/static/<path:filename>"): _PUBLIC,
    ("POST", "/logout"): _ANY_USER,  # sent last: it ends the session
    # --- API ------------------------------------------------------------------------------------
    ("GET", "/api/v1/openapi.json"): _PUBLIC,
    ("POST", "/api/v1/messages"): _API_SERVICES,
    ("GET", "/api/v1/messages/<message_id>"): _API_MESSAGE_READERS,
    ("POST", "/api/v1/exceptions"): _API_SERVICES,
    ("GET", "/api/v1/exceptions"): _API_QUEUE_READERS,
    ("GET", "/api/v1/exceptions/<int:exception_id>"): _API_PAYLOAD_READERS,
    ("POST", "/api/v1/exceptions/<int:exception_id>/decisions"): _API_DECIDERS,
    ("POST", "/api/v1/exceptions/bulk-decisions"): _API_DECIDERS,
    ("GET", "/api/v1/replays"): _API_QUEUE_READERS,
    ("GET", "/api/v1/replays/<int:replay_id>"): _API_QUEUE_READERS,
    ("POST", "/api/v1/replays/<int:replay_id>/approve"): _API_LEADS,
    ("POST", "/api/v1/replays/<int:replay_id>/reject"): _API_LEADS,
    ("GET", "/api/v1/bulk-replays"): _API_QUEUE_READERS,
    ("POST", "/api/v1/bulk-replays"): _API_DECIDERS,
    ("GET", "/api/v1/bulk-replays/<int:bulk_replay_id>"): _API_QUEUE_READERS,
    ("POST", "/api/v1/bulk-replays/<int:bulk_replay_id>/<action>"): _API_DECIDERS,
    ("GET", "/api/v1/drift"): _API_QUEUE_READERS,
    ("POST", "/api/v1/drift/<int:flag_id>/acknowledge"): _API_DECIDERS,
    ("GET", "/api/v1/audit"): _API_AUDIT_READERS,
    ("POST", "/api/v1/audit/verify"): _API_AUDIT_READERS,
    ("GET", "/api/v1/audit/export"): _API_EXPORTERS,
    ("GET", "/api/v1/customers"): _API_ADMINS,
    ("POST", "/api/v1/customers"): _API_ADMINS,
    ("GET", "/api/v1/connections"): _API_ADMINS,
    ("POST", "/api/v1/connections"): _API_ADMINS,
    ("GET", "/api/v1/connections/<int:connection_id>"): _API_ADMINS,
    ("PATCH", "/api/v1/connections/<int:connection_id>"): _API_ADMINS,
    ("POST", "/api/v1/connections/<int:connection_id>/circuit/reset"): _API_ADMINS,
    ("POST", "/api/v1/connections/<int:connection_id>/test"): _API_ADMINS,
    ("POST", "/api/v1/connections/<int:connection_id>/pause"): _API_ADMINS,
    ("POST", "/api/v1/connections/<int:connection_id>/resume"): _API_ADMINS,
    ("GET", "/api/v1/sla-rules"): _API_ADMINS,
    ("POST", "/api/v1/sla-rules"): _API_ADMINS,
    ("PATCH", "/api/v1/sla-rules/<int:rule_id>"): _API_ADMINS,
    ("DELETE", "/api/v1/sla-rules/<int:rule_id>"): _API_ADMINS,
    ("GET", "/api/v1/users"): _API_ADMINS,
    ("POST", "/api/v1/users"): _API_ADMINS,
    ("GET", "/api/v1/users/<int:user_id>"): _API_ADMINS,
    ("PATCH", "/api/v1/users/<int:user_id>"): _API_ADMINS,
    ("POST", "/api/v1/users/<int:user_id>/reset"): _API_ADMINS,
    ("POST", "/api/v1/users/<int:user_id>/approval-lock/clear"): _API_ADMINS,
    ("GET", "/api/v1/tokens"): _API_ADMINS,
    ("POST", "/api/v1/tokens"): _API_ADMINS,
    ("POST", "/api/v1/tokens/<int:token_id>/revoke"): _API_ADMINS,
}

MISSING_ID = "999999"  # past every row this test makes: an allowed change finds nothing (404)


def _url(rule: str, exception_id: int) -> str:
    """The rule with its arguments filled: the real exception, else ids no row has."""
    values = {
        "<int:exception_id>": str(exception_id),
        "<queue>": "all",
        "<secret>": "not-a-real-link",
        "<path:filename>": "console.css",
        "<message_id>": "no-such-message",
    }
    for placeholder, value in values.items():
        rule = rule.replace(placeholder, value)
    while "<int:" in rule:
        start = rule.index("<int:")
        rule = rule[:start] + MISSING_ID + rule[rule.index(">", start) + 1 :]
    return rule


def _outcome(response) -> str:
    status = response.status_code
    assert status < 500, status
    if status == 401:
        return AUTH
    if status == 403:
        return DENY
    location = urlsplit(response.headers.get("Location", ""))
    if status in (301, 302, 303) and location.path == "/login":
        return LOGIN
    return OK


def _console_routes(app) -> set[tuple[str, str]]:
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def test_every_route_of_the_url_map_is_in_the_matrix(app):
    routes = _console_routes(app)
    assert routes - set(MATRIX) == set(), "routes missing from MATRIX: add a row with each role's outcome"
    assert set(MATRIX) - routes == set(), "MATRIX rows for routes that no longer exist"


def test_the_matrix_holds_for_real_requests(app, users, make, make_tokens, audit_events):
    """Every cell, as a real request; all mismatches reported at once."""
    exception_id = make()
    tokens = make_tokens(*PEOPLE.values())
    clients = {}
    for role in ROLES:
        client = app.test_client()
        if role in PEOPLE:
            token = csrf_token(client, "/login")
            login = client.post(
                "/login", data={"username": PEOPLE[role], "password": PASSWORD, "csrf_token": token}
            )
            assert login.status_code == 302, role
        clients[role] = (client, csrf_token(client, "/login"))

    mismatches = []
    # /logout last: it ends the session the other console cells use
    for (method, rule), expected in sorted(MATRIX.items(), key=lambda row: row[0][1] == "/logout"):
        url = _url(rule, exception_id)
        for role, want in zip(ROLES, expected, strict=True):
            client, csrf = clients[role]
            logouts = len(audit_events(action="auth.logout")) if rule == "/logout" else 0
            if rule.startswith("/api/"):
                bearer = {"anonymous": None, "service": users["svc_token"]}.get(
                    role, tokens.get(PEOPLE.get(role))
                )
                headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
                json = {} if method in ("POST", "PATCH") else None
                response = client.open(url, method=method, headers=headers, json=json)
            else:
                headers = {"Authorization": f"Bearer {users['svc_token']}"} if role == "service" else {}
                data = {"csrf_token": csrf} if method == "POST" else None
                response = client.open(url, method=method, headers=headers, data=data)
            response.get_data()
            response.close()  # a streamed answer left open keeps its request context (and user)
            got = _outcome(response)
            if rule == "/logout" and len(audit_events(action="auth.logout")) > logouts:
                got = OK  # the view ran (and sent the user to the login page)
            if got != want:
                mismatches.append(
                    f"{method} {rule} as {role}: expected {want}, got {got} ({response.status_code})"
                )
    assert mismatches == [], "\n".join(mismatches)
    print(f"\nRBAC matrix: {len(MATRIX)} routes × {len(ROLES)} roles = {len(MATRIX) * len(ROLES)} cells")
