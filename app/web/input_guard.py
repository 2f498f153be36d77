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


# NULs are looked for down to this container depth (the root is 0); the depth limit refuses a
# body long before a real one gets there.
_NUL_DEPTH = 20


def scan_json(body) -> tuple[bool, bool]:
    """One pass over a parsed JSON body: (nests deeper than MAX_JSON_DEPTH, holds a NUL in a key
    or string). Payload fields (PAYLOAD_FIELDS, at any level) are not looked into for NULs, and
    neither is a container nested deeper than _NUL_DEPTH; every container counts for the depth.
    Without recursion."""
    if isinstance(body, str):
        return False, "\x00" in body
    if not isinstance(body, dict | list):
        return False, False
    nul = False
    stack = [(body, 0, True)]
    while stack:
        item, depth, look = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            return True, nul
        look = look and depth <= _NUL_DEPTH
        if isinstance(item, dict):
            for key, value in item.items():
                look_here = look and not nul and key not in PAYLOAD_FIELDS
                if look_here and (
                    (isinstance(key, str) and "\x00" in key) or (isinstance(value, str) and "\x00" in value)
                ):
                    nul = True
                if isinstance(value, (dict, list)):
                    stack.append((value, depth + 1, look_here))
        else:
            for value in item:
                if look and not nul and isinstance(value, str) and "\x00" in value:
                    nul = True
                if isinstance(value, (dict, list)):
                    stack.append((value, depth + 1, look))
    return False, nul


def _too_deep():
    return error_response(400, "invalid_json", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")


def init_app(app: Flask) -> None:
    @app.before_request
    def _reject_nul():
        req = request._get_current_object()  # one context look-up, not one per attribute
        if req.mimetype == "application/json":
            try:
                body = req.get_json(silent=True)
            except RecursionError:
                return _too_deep()
            too_deep, nul = scan_json(body)
            if too_deep:
                return _too_deep()
        else:
            nul = any(
                "\x00" in k or "\x00" in v for k, v in req.form.items(multi=True) if k not in PAYLOAD_FIELDS
            )
        # No query string, no arguments to parse.
        if not nul and req.query_string:
            nul = any("\x00" in k or "\x00" in v for k, v in req.args.items(multi=True))
        if nul:
            return error_response(400, "invalid_characters", "request fields must not contain NUL characters")
        return None
