"""Errors: JSON for the API, a page (or form message) for the console, never a bare 500."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from flask import Flask, flash, jsonify, make_response, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from app.domain.errors import DomainError

log = logging.getLogger("recon.web")


def wants_json() -> bool:
    return request.blueprint == "api" or request.path.startswith("/api/")


def error_response(status: int, code: str, message: str):
    if wants_json():
        response = jsonify({"error": {"code": code, "message": message}})
        response.status_code = status
        return response
    return render_template("error.html", status=status, code=code, message=message), status


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def current_page() -> str:
    """The page the user is on, as a same-site path: for an htmx request the browser's URL
    (HX-Current-URL), not the fragment's; otherwise this request's path and query."""
    if is_htmx():
        page = urlsplit(request.headers.get("HX-Current-URL", ""))
        if page.netloc == request.host and page.path.startswith("/"):
            return page.path + (f"?{page.query}" if page.query else "")
        return "/"
    return request.full_path.rstrip("?") if request.method == "GET" else (_referring_page() or "/")


def _referring_page() -> str | None:
    ref = urlsplit(request.referrer or "")
    if ref.netloc == request.host and ref.path.startswith("/"):
        return ref.path + (f"?{ref.query}" if ref.query else "")
    return None


def to_page(url: str, status: int = 303):
    """Send the browser to `url` as a whole page: HX-Redirect for an htmx request (the page
    replaces the document, never one fragment), a redirect otherwise."""
    if is_htmx():
        response = make_response("", 200)
        response.headers["HX-Redirect"] = url
        return response
    return redirect(url, code=status)


def to_login():
    """The login page, with `next` back to the page the user was on."""
    page = current_page()
    return to_page(url_for("auth.login", next=page) if page != "/" else url_for("auth.login"), 302)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError):
        return error_response(exc.http_status, exc.code, exc.message)

    @app.errorhandler(CSRFError)
    def _csrf(exc: CSRFError):
        if wants_json():
            return error_response(400, "csrf", f"CSRF check failed: {exc.description}")
        if not current_user.is_authenticated:
            # The session ended (and took its CSRF secret): log in, then back to the page.
            flash("Your session ended, so that was not saved. Please log in again.")
            return to_login()
        if is_htmx():
            # A page older than this session: reload it whole rather than fail silently.
            flash("That page had expired, so it was not saved. Please try again.")
            return to_page(current_page())
        return error_response(400, "csrf", f"CSRF check failed: {exc.description}")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.response is not None:  # a response made for this error (e.g. the throttled login page)
            return exc.response
        code = (exc.name or "error").lower().replace(" ", "_")
        response = make_response(error_response(exc.code or 500, code, exc.description or exc.name))
        # What the exception says the client needs: Allow on 405 (RFC 9110), Retry-After, ...
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal error; it has been logged")
