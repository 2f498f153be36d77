"""Parsing API requests: a JSON object body, typed fields and paging parameters. A wrong type is
422 with the field's name, never a TypeError deeper down (a 500)."""

from __future__ import annotations

from typing import Any

from flask import request

from app.domain.errors import DomainError, Invalid

from ..input_guard import MAX_ROW_ID

_MISSING = object()
_KINDS = {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list of strings"}
# What each kind accepts, checked for the one kind asked (not all five per field).
_CHECKS = {
    str: lambda value: isinstance(value, str),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    bool: lambda value: isinstance(value, bool),
    float: lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    list: lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value),
}


def json_object() -> dict:
    """The request body as a JSON object (400 when it is not one)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise DomainError("request body must be a JSON object", code="invalid_json")
    return body


def field(body: dict, name: str, kind: type, *, required: bool = False, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (str, int, bool, float, or list of str); null counts as
    absent. Missing and required: 422."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise Invalid(f"{name} is required", code="invalid_body")
        return default
    if not _CHECKS[kind](value):
        raise Invalid(f"{name} must be {_KINDS[kind]}", code="invalid_body")
    return value


def present(body: dict, names: tuple[str, ...]) -> dict:
    """The subset of `names` the body carries (a PATCH changes only what it names)."""
    return {n: body[n] for n in names if n in body}


def limit_arg(default: int, maximum: int) -> int:
    try:
        return min(max(int(request.args.get("limit", default)), 1), maximum)
    except ValueError:
        raise Invalid("limit must be an integer", code="invalid_parameter") from None


def id_cursor() -> int | None:
    """A keyset cursor that is a row id (422 when it is not one)."""
    value = request.args.get("cursor") or None
    if value is None:
        return None
    try:
        cursor = int(value)
        if not 0 <= cursor <= MAX_ROW_ID:
            raise ValueError
    except ValueError:
        raise Invalid("cursor must be a cursor this API returned", code="invalid_parameter") from None
    return cursor
