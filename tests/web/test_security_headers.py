"""Issue 7, Headers: every response type carries the security headers; authenticated ones are
never cached; HSTS only when configured; the CSP allows no eval and no inline script or style,
and htmx is configured to need neither."""

from __future__ import annotations

import re

import pytest

from app.web.access import public
from tests.conftest import csrf_token

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def _csp(response) -> dict[str, str]:
    policy = response.headers["Content-Security-Policy"]
    return {part.split()[0]: " ".join(part.split()[1:]) for part in policy.split(";") if part.strip()}


def assert_secured(response, *, cached_ok: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code, dict(response.headers))
    csp = _csp(response)
    assert csp["frame-ancestors"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    whole = response.headers["Content-Security-Policy"]
    assert "unsafe-eval" not in whole and "unsafe-inline" not in whole
    if not cached_ok:
        assert response.headers.get("Cache-Control") == "no-store", (
            response.status_code,
            response.request.path,
        )


@pytest.fixture
def boom(app):
    """A route that fails with an unexpected error (registered before the first request)."""

    @public
    def explode():
        raise RuntimeError("unexpected")

    app.add_url_rule("/_test_boom", "test_boom", explode)
    return "/_test_boom"


def test_headers_on_every_response_type(client, login, make, users, boom, post):
    exc_id = make()
    # anonymous: the login page, a redirect to it, static files, health, metrics, 404, 405
    assert_secured(client.get("/login"))
    redirect = client.get("/queues")
    assert redirect.status_code == 302
    assert_secured(redirect)
    static = client.get("/static/console.js")
    assert static.status_code == 200
    assert_secured(static, cached_ok=True)
    static.close()
    assert_secured(client.get("/healthz"))
    assert_secured(client.get("/metrics"))
    assert_secured(client.get("/no-such-page"))
    not_allowed = client.delete("/login")
    assert not_allowed.status_code == 405
    assert_secured(not_allowed)
    # an unexpected error is still a page with the headers
    failed = client.get(boom)
    assert failed.status_code == 500
    assert_secured(failed)
    # API: JSON answers, refusals and errors
    api = {"Authorization": f"Bearer {users['svc_token']}"}
    assert_secured(client.get("/api/v1/openapi.json"))
    assert_secured(client.get("/api/v1/exceptions"))  # 401
    assert_secured(client.get("/api/v1/exceptions", headers=api))  # 403 for a service account
    assert_secured(client.post("/api/v1/messages", json={}, headers=api))  # 400 no key
    # console, logged in: a page, a fragment, a forbidden page, a form error
    login("rita")
    assert_secured(client.get("/"))
    page = client.get(f"/exceptions/{exc_id}")
    assert page.status_code == 200
    assert_secured(page)
    fragment = client.get("/queues/all", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.get_data(as_text=True)
    assert_secured(fragment)
    assert_secured(client.get("/admin"))  # 403
    refused = post(f"/exceptions/{exc_id}/decide", {"action": "discard", "reason_code": "bogus"})
    assert refused.status_code == 422
    assert_secured(refused)
    throttled = client.application.config["RECON_SETTINGS"]
    throttled.login_limit_account = "1 per 15 minutes"
    other = client.application.test_client()
    for expected in (401, 429):
        token = csrf_token(other, "/login")
        r = other.post("/login", data={"username": "x", "password": "y", "csrf_token": token})
        assert r.status_code == expected
        assert_secured(r)


def test_hsts_only_when_configured(monkeypatch, database_url, redis_url):
    from app import create_app

    plain = create_app({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True})
    assert "Strict-Transport-Security" not in plain.test_client().get("/login", base_url="https://x").headers
    monkeypatch.setenv("RECON_HSTS_SECONDS", "31536000")
    strict = create_app({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True})
    # The headers are computed once and kept (app/web/security.py): a plain request first must
    # not leave the secure ones without HSTS, nor the other way round.
    client = strict.test_client()
    assert "Strict-Transport-Security" not in client.get("/login").headers
    r = client.get("/login", base_url="https://console.example")
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert r.headers["Content-Security-Policy"] == client.get("/login").headers["Content-Security-Policy"]
    forwarded = client.get("/login", headers={"X-Forwarded-Proto": "https"})
    assert forwarded.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in client.get("/login").headers


def test_session_cookie_is_secure_outside_localhost(client, users):
    from tests.conftest import PASSWORD, csrf_token

    # localhost: a local demo over plain http keeps working
    token = csrf_token(client, "/login")
    r = client.post("/login", data={"username": "rita", "password": PASSWORD, "csrf_token": token})
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    # any other host: Secure by default
    remote = client.application.test_client()
    r = remote.get("/login", base_url="https://console.example")
    assert "; Secure" in r.headers["Set-Cookie"]


def test_secure_cookies_can_be_forced_either_way(monkeypatch, database_url, redis_url):
    from app import create_app

    monkeypatch.setenv("RECON_SECURE_COOKIES", "true")
    app = create_app({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True})
    assert "; Secure" in app.test_client().get("/login").headers["Set-Cookie"]
    monkeypatch.setenv("RECON_SECURE_COOKIES", "false")
    app = create_app({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True})
    r = app.test_client().get("/login", base_url="https://console.example")
    assert "Secure" not in r.headers["Set-Cookie"]


def test_htmx_runs_without_eval_inline_scripts_or_styles(client, login):
    html = login("rita").get("/").get_data(as_text=True)
    config = re.search(r'name="htmx-config" content=\'([^\']+)\'', html).group(1)
    assert '"allowEval":false' in config
    assert '"allowScriptTags":false' in config
    assert '"includeIndicatorStyles":false' in config
    # nothing inline that the CSP would block
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)
