"""Reject NUL characters in form fields, query strings and JSON fields before they reach a query:
PostgreSQL text cannot hold them (a 500 otherwise). Message payloads are the exception — intake
keeps their exact bytes and turns an unreadable one into a data_shape exception."""

from __future__ import annotations

from flask import Flask, request

from .errors import error_response

# Kept as sent and made safe by the service: message payloads (bytes preserved) and an interface
# engine's own error text (POST /api/v1/exceptions: its report must not be lost over a NUL).
PAYLOAD_FIELDS = frozenset({"payload", "error"})


def _has_nul(value, depth: int = 0) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if depth > 20:
        return False
    if isinstance(value, dict):
        return any(
            k not in PAYLOAD_FIELDS and (_has_nul(k) or _has_nul(v, depth + 1)) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_has_nul(v, depth + 1) for v in value)
    return False


def init_app(app: Flask) -> None:
    @app.before_request
    def _reject_nul():
        fields = list(request.args.items(multi=True))
        if request.mimetype == "application/json":
            body = request.get_json(silent=True)
            if _has_nul(body):
                fields.append(("json", "\x00"))
        else:
            fields += [(k, v) for k, v in request.form.items(multi=True) if k not in PAYLOAD_FIELDS]
        if any(_has_nul(k) or _has_nul(v) for k, v in fields):
            return error_response(400, "invalid_characters", "request fields must not contain NUL characters")
        return None
