"""Response headers, session cookies and login throttles (docs/SECURITY.md).

* Headers through flask-talisman: a CSP with no inline script or style and no eval (htmx runs
  with allowEval false, templates/base.html), frame-ancestors 'none', nosniff, Referrer-Policy,
  HSTS when RECON_HSTS_SECONDS is set; `Cache-Control: no-store` on everything but static files.
* The session cookie is Secure when configured, and by default for any host but localhost.
* Failed logins are counted per account and per client address with flask-limiter on the app's
  Redis (shared by every web process); a throttled login is refused before its password is read.
"""

from __future__ import annotations

import hashlib
import logging

from flask import Flask, Response, current_app, request
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limiter, RequestLimit
from flask_talisman import Talisman
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import Settings

log = logging.getLogger("recon.security")

CSP = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "font-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def settings() -> Settings:
    return current_app.config["RECON_SETTINGS"]


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie session with the Secure flag decided per request: always, never, or
    (auto) for every host except localhost, so a local demo over http still logs in."""

    def open_session(self, app: Flask, request):
        # The API authenticates with bearer tokens and never reads or sets the console's cookie:
        # no signing serializer per API request (intake's hot path), and no Set-Cookie.
        if request.path.startswith("/api/"):
            return self.null_session_class()
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        mode = app.config["RECON_SETTINGS"].secure_cookies
        if mode == "always":
            return True
        if mode == "never":
            return False
        return request.host.rsplit(":", 1)[0] not in LOCAL_HOSTS if request else True


class _Talisman(Talisman):
    """flask-talisman, with the headers it computes kept: they are the same for every response
    (no view has options of its own, no CSP nonce), except HSTS, which only a secure request gets.
    Talisman re-parses the CSP and permissions policies per response otherwise — a twentieth of
    an intake request's CPU. A view given options of its own is still answered by Talisman."""

    def __init__(self, *args, **kwargs):
        self._headers_for: dict[bool, list[tuple[str, str]]] = {}
        super().__init__(*args, **kwargs)

    def init_app(self, app: Flask, **kwargs):
        super().init_app(app, **kwargs)
        # Talisman's two before-request hooks, _force_https and _make_nonce, do nothing unless
        # HTTPS is forced, the session cookie made Secure, a CSP nonce wanted or the view has
        # options of its own: one hook in their place runs them only then.
        before = app.before_request_funcs.setdefault(None, [])
        hooks = [self._force_https, self._make_nonce]
        if before[-2:] == hooks:
            before[-2:] = [self._before_request]

    def _before_request(self):
        if not (self.force_https or self.session_cookie_secure or self.content_security_policy_nonce_in):
            req = request._get_current_object()
            view = current_app.view_functions.get(req.endpoint)
            if getattr(view, "talisman_view_options", None) is None:
                return None
        redirect = self._force_https()
        if redirect is not None:
            return redirect
        return self._make_nonce()

    def _set_response_headers(self, response):
        req = request._get_current_object()
        view = current_app.view_functions.get(req.endpoint)
        if getattr(view, "talisman_view_options", None) is not None:
            return super()._set_response_headers(response)
        secure = req.is_secure or req.headers.get("X-Forwarded-Proto", "http") == "https"
        headers = self._headers_for.get(secure)
        if headers is None:
            probe = Response()
            before = set(probe.headers.keys())
            super()._set_response_headers(probe)
            headers = self._headers_for[secure] = [
                (k, v) for k, v in probe.headers.items() if k not in before
            ]
        for name, value in headers:
            response.headers[name] = value
        return response


def client_address() -> str:
    """The client's address (behind RECON_TRUSTED_PROXIES proxies, the one they forwarded)."""
    return request.remote_addr or "-"


def login_account() -> str:
    """The account a login attempt names, normalised, so `Lena` and `lena ` share one counter."""
    return (request.form.get("username") or "").strip().lower()[:80] or "-"


def _failed_login(response) -> bool:
    return response.status_code == 401


def _throttled(scope: str):
    def on_breach(_limit: RequestLimit):
        from .auth.routes import login_throttled

        log.warning("login throttled", extra={"path": request.path, "throttle": scope})
        return login_throttled()

    return on_breach


def _storage_uri(app_settings: Settings) -> str:
    from app.adapters.redis_conn import redis_url

    url = redis_url(app_settings)
    # limits names a Redis socket redis+unix://; redis-py names it unix://.
    return "redis+" + url if url.startswith("unix://") else url


def init_app(app: Flask, app_settings: Settings) -> None:
    if app_settings.trusted_proxies:
        n = app_settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)
    app.session_interface = SessionCookies()
    _Talisman(
        app,
        force_https=False,  # TLS ends at the load balancer; it redirects
        session_cookie_secure=False,  # decided per request by SessionCookies
        session_cookie_samesite="Lax",
        strict_transport_security=app_settings.hsts_seconds > 0,
        strict_transport_security_max_age=app_settings.hsts_seconds,
        strict_transport_security_include_subdomains=False,
        content_security_policy=CSP,
        frame_options="DENY",
        referrer_policy="same-origin",
        permissions_policy={"geolocation": "()", "camera": "()", "microphone": "()"},
    )

    @app.after_request
    def _no_store(response):
        # Pages, fragments and API answers carry PHI or per-user state: never cached anywhere.
        headers = response.headers
        if request.endpoint != "static":
            headers["Cache-Control"] = "no-store"
            headers["Pragma"] = "no-cache"
        # One URL answers a whole page or, to htmx, a fragment: no cache (the browser's included)
        # may hand one out for the other, so Back/Forward always restore a whole page. No Vary
        # yet (nearly every response): the header is set as response.vary.add would set it.
        if "Vary" in headers:
            response.vary.add("HX-Request")
        else:
            headers["Vary"] = "HX-Request"
        return response

    _init_login_throttle(app, app_settings)


def _skip_hooks_for_api(app: Flask, limiter: Limiter) -> None:
    """Wrap the limiter's before-, after- and teardown-request hooks so that they do nothing for
    an API request (each found by identity; any not found is left as it is)."""

    def is_api() -> bool:
        return request.blueprint == "api"

    before = app.before_request_funcs.get(None, [])
    for i, hook in enumerate(before):
        if hook == limiter._check_request_limit:
            before[i] = lambda: None if is_api() else limiter._check_request_limit()
    after = app.after_request_funcs.get(None, [])
    for i, hook in enumerate(after):
        if getattr(hook, "args", None) == (limiter,):  # partial(Limiter.__inject_headers, limiter)
            after[i] = (lambda h: lambda response: response if is_api() else h(response))(hook)
    teardown = app.teardown_request_funcs.get(None, [])
    for i, hook in enumerate(teardown):
        if getattr(hook, "__self__", None) is limiter:  # limiter's per-request context release
            teardown[i] = (lambda h: lambda exc=None: None if is_api() else h(exc))(hook)


def _init_login_throttle(app: Flask, app_settings: Settings) -> None:
    # One prefix per deployment (its database): deployments sharing a Redis, or test runs with a
    # fresh database each, never share counters.
    prefix = "recon-limits:" + hashlib.sha256(app_settings.database_url.encode()).hexdigest()[:16]
    limiter = Limiter(
        key_func=client_address,
        app=app,
        storage_uri=_storage_uri(app_settings),
        key_prefix=prefix,
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=True,  # Redis down: fall back to per-process counters, never a 500
        in_memory_fallback_enabled=True,
    )
    # Only the login view has limits (checked by its decorators below). The limiter's own
    # request hooks look up which limits apply to every request; API requests (intake's hot path)
    # skip those hooks altogether.
    limiter.request_filter(lambda: request.blueprint == "api")
    _skip_hooks_for_api(app, limiter)
    view = app.view_functions["auth.login"]
    view = limiter.limit(
        lambda: settings().login_limit_account,
        key_func=login_account,
        methods=["POST"],
        deduct_when=_failed_login,
        scope="login-account",
        on_breach=_throttled("account"),
    )(view)
    view = limiter.limit(
        lambda: settings().login_limit_address,
        methods=["POST"],
        deduct_when=_failed_login,
        scope="login-address",
        on_breach=_throttled("address"),
    )(view)
    app.view_functions["auth.login"] = view
