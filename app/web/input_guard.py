"""Reject NUL characters in form fields, query strings and JSON fields before they reach a query:
PostgreSQL text cannot hold them (a 500 otherwise). Message payloads are the exception — intake
keeps their exact bytes and turns an unreadable one into a data_shape exception.

JSON bodies nested deeper than MAX_JSON_DEPTH are refused (400) before any code walks them: the
API's bodies are flat objects (a payload travels as a string), and Python's parser and
serialiser recurse, so a body nested a thousand levels deep used to end in a RecursionError."""

from __future__ import annotations

from flask import Flask, request

from .errors import error_response

# Kept as sent and made safe by the service: message payloads (bytes preserved) and an interface
# engine's own error text (POST /api/v1/exceptions: its report must not be lost over a NUL).
PAYLOAD_FIELDS = frozenset({"payload", "error"})
# Every id column is a 32-bit INTEGER on PostgreSQL: a larger id or cursor cannot name a row, and
# handing it to the database is an overflow error. Routes answer 404, cursors 422.
MAX_ROW_ID = 2**31 - 1
MAX_JSON_DEPTH = 32


def json_depth(value) -> int:
    """How deeply a parsed JSON value nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 > MAX_JSON_DEPTH:
                break
            stack.extend((child, depth + 1) for child in item)
    return deepest


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


def _too_deep():
    return error_response(400, "invalid_json", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")


def init_app(app: Flask) -> None:
    @app.before_request
    def _reject_nul():
        fields = list(request.args.items(multi=True))
        if request.mimetype == "application/json":
            try:
                body = request.get_json(silent=True)
            except RecursionError:
                return _too_deep()
            if json_depth(body) > MAX_JSON_DEPTH:
                return _too_deep()
            if _has_nul(body):
                fields.append(("json", "\x00"))
        else:
            fields += [(k, v) for k, v in request.form.items(multi=True) if k not in PAYLOAD_FIELDS]
        if any(_has_nul(k) or _has_nul(v) for k, v in fields):
            return error_response(400, "invalid_characters", "request fields must not contain NUL characters")
        return None
